"""Where a model runs and in which precision: the device ``auto`` picks, and the autocast dtype.

``amp: auto`` on CUDA is chosen by measurement (:func:`measured_amp`): bf16 autocast adds cast kernels,
and for a small model such as the CNN fp32 (TF32) measured faster on an H200. On a CPU the rule stands:
bf16 where the CPU has native bf16 instructions (3.5x there), never where it is emulated (10x slower).
``compile: auto`` on CUDA is chosen by measurement too (:func:`measured_compile`): CUDA graphs where the
time they save over the run exceeds the compilation (a warm one: inductor's on-disk caches make every
compile after a machine's first much cheaper); on a CPU it is off (measured on the 2-core dev
machine: the compiled CNN step, augmentation included, 547 ms against eager's 485 ms at batch 128).
"""

from __future__ import annotations

import json
import os
import statistics
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


def evaluation_precision(device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """Where and in which precision a run evaluated its model (kept with its weights and checkpoints)."""
    return {"device_type": device.type, "amp": "bf16" if amp_dtype is not None else "fp32"}


def inference_amp(amp: str, device: torch.device, evaluated: dict | None = None) -> torch.dtype | None:
    """The autocast dtype a loaded model predicts in. ``amp: auto`` on CUDA is measured per model when it
    trains (fp32 beats bf16 for the CNN on an H200), so a model evaluated on CUDA predicts on CUDA in the
    precision its run measured and tested in: the same numbers as its test. Elsewhere the rule applies
    (on CPUs it follows the hardware: native bf16 or not)."""
    if amp == "auto" and evaluated and evaluated.get("device_type") == device.type == "cuda":
        return torch.bfloat16 if evaluated.get("amp") == "bf16" else None
    return resolve_amp(amp, device)


def memory_format_for(channels_last: bool) -> torch.memory_format:
    """The layout a model trains, evaluates and predicts in (config ``channels_last``): one source, so a
    loaded model runs the same kernels, and gives the same numbers, as its training run's evaluation."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on ``device`` when ``dtype`` is given; a no-op context for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MeasurementCache:
    """One JSON file of measurements in the cache folder (``amp.json``, ``compile.json``), keyed by what
    they depend on (device, torch, model, input size, batch, ...). A read-only cache is not an error:
    the next run measures again."""

    def __init__(self, name: str):
        from fer_exp.data.cache import cache_dir

        self.path = cache_dir() / name
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        """Keep ``entry``, with what other processes (tuning workers) wrote meanwhile."""
        try:
            self.entries = {**json.loads(self.path.read_text()), key: entry}
        except (OSError, ValueError):
            self.entries = {**self.entries, key: entry}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")  # one per process: no torn file
            partial.write_text(json.dumps(self.entries, indent=1))
            os.replace(partial, self.path)
        except OSError:
            pass


def time_steps(device: torch.device, step: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    """Seconds per call of ``step`` after ``warmup`` untimed calls (the device synchronised around)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def measured_amp(device: torch.device, step: Callable[[torch.dtype | None], None], key: str,
                 repeats: int = 5) -> tuple[torch.dtype | None, str]:
    """(the faster of fp32 and bf16 autocast for ``step(dtype)``, what was measured). The choice is kept
    in the cache (``amp.json``) under ``key`` (device, torch, model, input size, batch), so every run of
    that setting on that machine makes the same one and pays for the measurement once. bf16 must be 5%
    faster to be chosen: fp32 is the more exact, and the reproducible, default."""
    cache = MeasurementCache("amp.json")
    entry = cache.get(key)
    if entry is not None:
        return (torch.bfloat16 if entry["choice"] == "bf16" else None), f"{entry['report']} (cached)"
    seconds = {name: time_steps(device, lambda: step(dtype), repeats)
               for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    choice = "bf16" if seconds["bf16"] < 0.95 * seconds["fp32"] else "fp32"
    report = f"measured {choice}: fp32 {seconds['fp32'] * 1e3:.2f} ms, bf16 {seconds['bf16'] * 1e3:.2f} ms a step"
    cache.put(key, {"choice": choice, "report": report})
    return (torch.bfloat16 if choice == "bf16" else None), report


AUTO_COMPILE_MODE = "reduce-overhead"  # what compile: auto tries on CUDA: CUDA graphs, for launch-bound steps


def measured_compile(device: torch.device, eager_step: Callable[[], None], compile_step: Callable[[], Callable[[], None]],
                     key: str, total_steps: int, repeats: int = 10) -> tuple[bool, str]:
    """(whether this run takes the compiled step, what was measured). ``compile_step()`` makes a new
    compilation and returns its step; the compilation the run takes is the last one made here, so it is
    never paid twice. A measurement compiles twice: cold, as the first run on a machine pays (inductor
    generates kernels and caches them on disk), then, after ``torch._dynamo.reset()`` (the state a new
    process starts in), warm, as later runs pay (Dynamo traces again, inductor loads its cached kernels).
    The run that measures has paid both: it takes the compiled step wherever that is 5% faster. A later
    run (the measurement kept in ``compile.json`` under ``key``) takes it where the seconds it saves over
    the run's ``total_steps`` also exceed the warm compilation's, and then compiles at once and keeps what
    that took (a new process pays a few seconds of set-up that a reset does not): the warm time is then the
    median of the last five such runs. The choice is made per run, as it depends on the run's length."""
    cache = MeasurementCache("compile.json")
    entry = cache.get(key)
    measuring = entry is None or "warm_compile_seconds" not in entry  # older entries had the cold time only
    if measuring:
        import torch._dynamo

        eager = time_steps(device, eager_step, repeats)
        step, cold = _first_calls(device, compile_step)
        torch._dynamo.reset()
        step, warm = _first_calls(device, compile_step)
        compiled = time_steps(device, step, repeats)
        entry = {"eager_ms": round(eager * 1e3, 3), "compiled_ms": round(compiled * 1e3, 3),
                 "compile_seconds": round(max(cold - 2 * compiled, 0.0), 2),
                 "warm_compile_seconds": round(max(warm - 2 * compiled, 0.0), 2)}
    faster = entry["compiled_ms"] < 0.95 * entry["eager_ms"]
    saved = total_steps * (entry["eager_ms"] - entry["compiled_ms"]) / 1e3
    observed = entry.get("observed_warm_seconds", [])  # what later runs' compiles took (the last five)
    warm = statistics.median(observed) if observed else entry["warm_compile_seconds"]
    pays = faster and (measuring or saved > warm)
    cost = (f"compile {entry['compile_seconds']:.1f} s cold, {warm:.1f} s warm"
            + (f" (median of {len(observed)} run(s))" if observed else " (after a reset)"))
    if measuring:
        cost += ", paid here"
    elif pays:  # compile now, and keep what it took: a new process pays set-up a reset does not (a median,
        # so one compile made cold again, after inductor's cache in /tmp was wiped, does not stick)
        _, seconds = _first_calls(device, compile_step)
        here = round(max(seconds - 2 * entry["compiled_ms"] / 1e3, 0.0), 2)
        entry = dict(entry, observed_warm_seconds=[*observed, here][-5:])
        cost += f", here {here:.1f} s"
    if measuring or pays:
        cache.put(key, entry)
    report = (f"{'measured' if measuring else 'cached'} {AUTO_COMPILE_MODE if pays else 'off'}: eager "
              f"{entry['eager_ms']:.2f} ms, compiled {entry['compiled_ms']:.2f} ms a step, {cost}; "
              f"{total_steps} steps {'save' if pays else 'would save'} {saved:.1f} s")
    return pays, report


def _first_calls(device: torch.device, compile_step: Callable[[], Callable[[], None]]) -> tuple[Callable[[], None], float]:
    """(a new compilation's step, the seconds of its first two calls): the first compiles; with CUDA
    graphs the next ones warm up and record."""
    start = time.perf_counter()
    step = compile_step()
    step()
    step()
    _sync(device)
    return step, time.perf_counter() - start
