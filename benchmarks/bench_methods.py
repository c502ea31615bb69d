"""Speed (not a test): seconds per training iteration of every method at its paper batch size, on --device.

    python benchmarks/bench_methods.py --device cpu --threads 2 --iters 4 --json bench_methods.json
    python benchmarks/bench_methods.py --device cuda --iters 50 --json bench_methods_gpu.json

Each script runs as users run it, for two short epochs on synthetic CIFAR-shaped data in the official layout and a
random teacher (speed does not depend on either), written to a temp folder. The figure is the second epoch's
`charts/images_per_s` from the run's own metrics (a student epoch for the generator methods; evaluation excluded),
turned into seconds per iteration. Each epoch ends by copying its loss sums to the host, so on a GPU the timing
includes all queued work (CUDA-synchronised). Comparisons with reference code belong in bench_vs_reference.py,
measured side by side.
"""
import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_reference import cpu_model  # noqa: E402

from common import CifarResNet  # noqa: E402

PAPER_BATCH = {"gdfq": 200, "ait": 200, "akt": 200, "lrq": 200, "faqd": 100, "sqakd": 256}
GENERATOR_METHODS = ("gdfq", "ait", "akt", "lrq")


def write_data(root, n_train, n_test=200):
    """Random uint8 CIFAR-10 in the official python layout."""
    rng = np.random.default_rng(0)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    per = -(-n_train // 5)
    for i in range(1, 6):
        with open(os.path.join(d, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, per).tolist()}, f)
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, n_test).tolist()}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=list(PAPER_BATCH), choices=list(PAPER_BATCH))
    p.add_argument("--iters", type=int, default=4, help="iterations per timed epoch")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()
    res = {"machine": {"cpu": cpu_model(), "device": a.device, "torch": torch.__version__,
                       "python": platform.python_version(), "threads": a.threads or torch.get_num_threads(),
                       "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None},
           "iters": a.iters}
    with tempfile.TemporaryDirectory() as tmp:
        write_data(os.path.join(tmp, "data"), n_train=max(PAPER_BATCH.values()) * a.iters)
        teacher = os.path.join(tmp, "teacher.pth")
        torch.save(CifarResNet(20, 10).state_dict(), teacher)
        for m in a.methods:
            b = PAPER_BATCH[m]
            if m in GENERATOR_METHODS:
                sched = ["--epochs", "2", "--warmup-epochs", "1", "--iters-per-epoch", str(a.iters)]
            else:
                sched = ["--epochs", "2", "--train-subset", str(b * a.iters)]
            cmd = [sys.executable, f"{m}.py", "--data-dir", os.path.join(tmp, "data"), "--teacher", teacher,
                   "--batch-size", str(b), "--device", a.device, "--threads", str(a.threads), "--out-dir", tmp,
                   "--run-name", m, *sched]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "CLEANQD_OFFLINE": "1"})
            if r.returncode:
                sys.exit(f"error: {m} failed: {r.stderr.strip().splitlines()[-1]}")
            with open(os.path.join(tmp, m, "metrics.jsonl")) as f:
                ips = [json.loads(line) for line in f][-1]["charts/images_per_s"]
            res[m] = {"batch": b, "s_per_iter": b / ips, "images_per_s": ips}
            print(f"{m:6s} batch {b:3d}: {b / ips:.3f} s/iter ({ips:.0f} images/s) on {a.device}", flush=True)
    print(json.dumps(res["machine"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
