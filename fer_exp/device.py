"""Where a model runs and in which precision: the device ``auto`` picks, and the autocast dtype.

``amp: auto`` on CUDA is chosen by measurement (:func:`measured_amp`): bf16 autocast adds cast kernels,
and for a small model such as the CNN fp32 (TF32) measured faster on an H200. On a CPU the rule stands:
bf16 where the CPU has native bf16 instructions (3.5x there), never where it is emulated (10x slower).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fer_exp.config import check_device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device(name)
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX), so bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on ``device`` when ``dtype`` is given; a no-op context for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_amp(device: torch.device, step: Callable[[torch.dtype | None], None], key: str,
                 repeats: int = 5) -> tuple[torch.dtype | None, str]:
    """(the faster of fp32 and bf16 autocast for ``step(dtype)``, what was measured). The choice is kept
    in the cache (``amp.json``) under ``key`` (device, torch, model, input size, batch), so every run of
    that setting on that machine makes the same one and pays for the measurement once. bf16 must be 5%
    faster to be chosen: fp32 is the more exact, and the reproducible, default."""
    from fer_exp.data.cache import cache_dir

    path = cache_dir() / "amp.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        entry = known[key]
        return (torch.bfloat16 if entry["choice"] == "bf16" else None), f"{entry['report']} (cached)"
    seconds = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        step(dtype)  # warm-up: kernel selection, allocations
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step(dtype)
        _sync(device)
        seconds[name] = (time.perf_counter() - start) / repeats
    choice = "bf16" if seconds["bf16"] < 0.95 * seconds["fp32"] else "fp32"
    report = f"measured {choice}: fp32 {seconds['fp32'] * 1e3:.2f} ms, bf16 {seconds['bf16'] * 1e3:.2f} ms a step"
    known[key] = {"choice": choice, "report": report}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(known, indent=1))
        os.replace(partial, path)
    except OSError:
        pass  # a read-only cache: measure again next time
    return (torch.bfloat16 if choice == "bf16" else None), report
