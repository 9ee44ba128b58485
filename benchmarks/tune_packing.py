"""Trials per hour of an Optuna study with 1 worker against several packed on one device.

    python benchmarks/tune_packing.py --data ../shared/fer2013 --workers 1 8 --seconds 120 --json out.json

For each worker count: a new study (experiments/tune_cnn.yaml unless --config says otherwise, the
pruner off so every trial costs the same, tracking off) runs ``fer-exp tune --workers W`` until
``--seconds`` have passed (trials in flight then finish). Reported per run: finished trials, wall
seconds (process start to end, worker start-up included), trials per hour, the median trial's
seconds, and the best val accuracy; then each count's speed-up over the first. ``--set NAME=VALUE``
fixes config fields for every trial (e.g. ``--set epochs=6 --set input_size=48``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_study(workers: int, args, storage: str, workdir: Path) -> dict:
    name = f"packing-{workers}w-{int(time.time())}"
    cmd = [sys.executable, "-m", "fer_exp.cli", "tune", "--config", args.config, "--data", args.data,
           "--study-name", name, "--storage", storage, "--workers", str(workers), "--timeout", str(args.seconds),
           "--n-trials", "100000", "--pruner", "none", "--tracking", "false", "--enqueue", "none"]
    for pair in args.set:
        key, _, value = pair.partition("=")
        cmd += [f"--{key.replace('_', '-')}", value]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=args.seconds + args.grace)
    wall = time.perf_counter() - start
    (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"workers": workers, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    return {"workers": workers, "finished_trials": len(done), "wall_seconds": round(wall, 1),
            "trials_per_hour": round(len(done) / wall * 3600, 1),
            "median_trial_seconds": round(statistics.median(seconds), 2) if seconds else None,
            "best_value": max((t.value for t in done), default=None),
            "epochs_per_trial": done[0].user_attrs.get("epochs_run") if done else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "experiments" / "tune_cnn.yaml"), help="study file")
    parser.add_argument("--data", required=True, help="FER2013 source")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8], help="worker counts to compare")
    parser.add_argument("--seconds", type=float, default=120, help="time budget of each study (its --timeout)")
    parser.add_argument("--grace", type=float, default=300, help="seconds allowed beyond it before the run is killed")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fix a config field")
    parser.add_argument("--storage", default=None, help="Optuna storage (default: a temporary sqlite file)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here too (after every run)")
    args = parser.parse_args(argv)
    args.config = str(Path(args.config).resolve())  # the studies run in a folder of their own
    if Path(args.data).exists():
        args.data = str(Path(args.data).resolve())
    workdir = Path(tempfile.mkdtemp(prefix="fer-packing-"))  # the studies' outputs; removed at the end
    storage = args.storage or f"sqlite:///{workdir / 'optuna.db'}"
    results = {"config": args.config, "data": args.data, "seconds": args.seconds, "set": args.set, "runs": []}
    try:
        for workers in args.workers:
            results["runs"].append(run_study(workers, args, storage, workdir))
            first = results["runs"][0].get("trials_per_hour")
            for run in results["runs"]:
                if first and run.get("trials_per_hour"):
                    run["speedup"] = round(run["trials_per_hour"] / first, 2)
            print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a failed study's log tail is in its result
    print(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
