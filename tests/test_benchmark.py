"""The throughput benchmark runs end to end on a small synthetic set (correctness, not timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_smoke(tmp_path):
    env = dict(os.environ, FER_EXP_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--data", "synthetic:128,32,32",
           "--batches", "2", "--batch-size", "16", "--eval-batch-size", "16", "--rounds", "1", "--workers", "1",
           "--resnet-batches", "1", "--resnet-batch-size", "4", "--json", "--cold-start", "--cold-start-repeats", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    ips = results["images_per_second"]
    for group in ("cnn", "resnet18@112"):
        for method in ("fer-exp", "compute bound"):
            assert ips[group][method]["train"] > 0 and ips[group][method]["eval"] > 0
    assert ips["cnn"]["conventional"]["train"] > 0 and ips["cnn"]["conventional"]["eval"] > 0
    assert set(ips["cnn ablations"]) == {"channels_last off", "fused AdamW off (foreach)", "bf16 autocast", "fp32 (amp off)"}
    assert {"cnn train fer-exp/conventional", "cnn train fer-exp/compute bound", "cnn eval fer-exp/conventional",
            "resnet18@112 train fer-exp/compute bound"} <= set(results["ratios"])
    assert all(v > 0 for v in results["ratios"].values())
    assert len(results["cold_start_seconds"]) == 1 and all(0 < s < 120 for s in results["cold_start_seconds"])
