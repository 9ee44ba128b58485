"""Where a training step's time goes: the real ``Trainer.train_step`` (augmentation, forward, loss,
backward, AdamW, EMA, schedule) and the compute bound's ``Trainer.optimize`` on one pre-made batch,
timed and then profiled with ``torch.profiler``.

    python benchmarks/profile_step.py --data ../shared/fer2013 --json profile.json
    python benchmarks/profile_step.py --config experiments/resnet18.yaml --set input_size=224 --set pretrained=none

For each of the two it reports wall milliseconds a step (timed without the profiler), the device's busy
milliseconds a step (the kernels' summed time, CUDA only), the kernel launches (CUDA graph replays
counted apart) and host syncs a step, the operators a step runs, and the top operators by host and by
device time. Wall far above device time means the step is bound by launches and Python, not by the
GPU: that is what CUDA graphs (``compile: reduce-overhead``) remove. ``--set`` overrides any config
field, as in ``full_training.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from fer_exp.augment import to_float
from fer_exp.config import ConfigError, load_config
from fer_exp.data import DataError
from fer_exp.experiment import load_run_data
from fer_exp.device import time_steps
from fer_exp.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_training import add_config_arguments, parse_sets  # noqa: E402 (the benchmarks folder is not a package)

# host-side events that stand for one kernel launch, one CUDA graph replay, one host sync
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
GRAPH_REPLAYS = ("cudaGraphLaunch",)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile(step, device: torch.device, steps: int, warmup: int, top: int) -> dict:
    """Times ``step`` over ``steps`` calls (after ``warmup``), then profiles as many more."""
    wall = time_steps(device, step, steps, warmup=warmup)
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    # device time: the kernels' own time (self), summed over every operator
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) if device.type == "cuda" else None
    ops = sum(e.count for e in events if e.key.startswith("aten::"))

    def per_step(names) -> float:
        return round(sum(counts.get(name, 0) for name in names) / steps, 2)

    table = {}
    for sort in ("self_cpu_time_total",) + (("self_device_time_total",) if device.type == "cuda" else ()):
        try:
            table[sort] = events.table(sort_by=sort, row_limit=top, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):  # older torch: cuda instead of device
            table[sort] = events.table(sort_by=sort.replace("device", "cuda"), row_limit=top, max_name_column_width=60)
    return {"wall_ms_per_step": round(wall * 1e3, 3),
            "device_busy_ms_per_step": None if device_us is None else round(device_us / steps / 1e3, 3),
            "kernel_launches_per_step": per_step(LAUNCHES), "graph_replays_per_step": per_step(GRAPH_REPLAYS),
            "host_syncs_per_step": per_step(SYNCS), "aten_ops_per_step": round(ops / steps, 1), "tables": table}


def run(config: str | None, data_source: str | None, sets: list[str], steps: int, warmup: int, top: int) -> dict:
    overrides = parse_sets(sets)
    if data_source:
        overrides["data"] = data_source
    cfg = load_config(config, overrides)
    data = load_run_data(cfg)
    # a folder never made: the profile times steps and never fits, so nothing is saved (mkdtemp left one a call)
    trainer = Trainer(cfg, data, checkpoint_dir=Path(tempfile.gettempdir()) / "fer-profile-never-written", progress=False)
    trainer.model.train()
    images, labels = trainer.splits["train"]
    batch = min(cfg.batch_size, images.shape[0])
    order = torch.randperm(images.shape[0], device=trainer.device, generator=trainer.generator)
    state = {"step": 0}

    def fer_exp_step():  # as train_epoch takes it: a fresh shuffled batch, gathered on the device
        start = (state["step"] * batch) % max(images.shape[0] - batch + 1, 1)
        index = order[start:start + batch]
        state["step"] += 1
        trainer.train_step(images[index], labels[index])

    fixed_x, fixed_y = to_float(images[:batch]), labels[:batch]

    def compute_bound_step():
        trainer.optimize(fixed_x, fixed_y)

    device = trainer.device
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": cfg.to_dict(), "batch_size": batch, "steps": steps,
              "amp_choice": trainer.amp_report, "compile_choice": trainer.compile_report}
    result["fer-exp"] = profile(fer_exp_step, device, steps, warmup, top)
    result["compute bound"] = profile(compute_bound_step, device, steps, warmup, top)
    result["fer-exp/compute bound"] = round(result["compute bound"]["wall_ms_per_step"] / result["fer-exp"]["wall_ms_per_step"], 3)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="steps timed, then as many profiled")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (a compiled step compiles here)")
    parser.add_argument("--top", type=int, default=15, help="operators in each table")
    args = parser.parse_args(argv)
    try:
        result = run(args.config or None, args.data, args.set, args.steps, args.warmup, args.top)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}, torch {result['torch']}, {result['config']['model']} at {result['config']['input_size']} px, "
          f"batch {result['batch_size']}; compile {result['compile_choice']}; amp {result['amp_choice']}")
    for name in ("fer-exp", "compute bound"):
        r = result[name]
        print(f"{name:14s} wall {r['wall_ms_per_step']:.2f} ms/step, device busy {r['device_busy_ms_per_step']} ms/step, "
              f"{r['kernel_launches_per_step']} launches, {r['graph_replays_per_step']} graph replays, "
              f"{r['host_syncs_per_step']} syncs, {r['aten_ops_per_step']} aten ops a step")
    for name in ("fer-exp", "compute bound"):
        for sort, table in result[name]["tables"].items():
            print(f"\n{name}, by {sort}:\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
