"""Speed (not a test): seconds per training iteration of every method at its paper batch size, on --device, and
where it stands against the machine's measured peak (the roofline).

    python benchmarks/bench_methods.py --device cpu --threads 2 --iters 4 --json bench_methods.json
    python benchmarks/bench_methods.py --device cpu --threads 2 --extra="--compile --amp bf16"
    python benchmarks/bench_methods.py --device cuda --iters 50 --json bench_methods_gpu.json
    python benchmarks/bench_methods.py --side-by-side --device cpu --threads 2 --rounds 3 --json side_by_side.json

Each script runs as users run it, for three short epochs (one warm-up for the generator methods) on synthetic
CIFAR-shaped data in the official layout and a random teacher (speed does not depend on either), written to a temp
folder, with --extra's flags. The figure is the last epoch's `charts/images_per_s` from the run's own metrics (a
student epoch; evaluation excluded; with --compile, the compiling is in the earlier epochs), turned into seconds per
iteration. Each epoch ends by copying its loss sums to the host, so on a GPU the timing includes all queued work
(CUDA-synchronised). Comparisons with reference code belong in bench_vs_reference.py, measured side by side.

Roofline: the FLOPs of one iteration of that epoch (benchmarks/flop_count.py: torch.utils.flop_counter, matrix
products and convolutions, forward and backward, at the same batch) over its time, against the peak of a large
matrix product (--peak-n square, float32 and bfloat16) timed in this process on the same threads.

--side-by-side: per method, eager against each flag set (--compile, --amp bf16, both), one run of each per round,
back to back with the order rotated between rounds; the speedup of a round is eager's time over the flag set's in that
round, reported as the median and min-max over the rounds (JSON: s/iter and speedups per method and flag set).

--breakdown: where the rest goes. One more short run of each script under torch.profiler (flop_count.py --profile)
splits a student epoch's iteration into convolutions and matrix products, batch norm, the other operators and the
time outside any operator; the FLOPs over the convolutions' own time is the rate the convolutions themselves reach.
"""
import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import CifarResNet, cpu_model  # noqa: E402

PAPER_BATCH = {"gdfq": 200, "ait": 200, "akt": 200, "lrq": 200, "synq": 256, "faqd": 100, "sqakd": 256}
GENERATOR_METHODS = ("gdfq", "ait", "akt", "lrq", "synq")
METHOD_ARGS = {"synq": lambda b: ["--num-images", str(b), "--syn-batch", str(b), "--syn-iters", "2"]}  # stage 1: tiny


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


def matmul_peak(n, dtype, device, reps=20):
    """FLOP/s of an n x n matrix product (the best of `reps`, after one untimed). On a shared VM it moves by a
    quarter between runs: the figure is measured again after the methods and the higher one kept."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return _best_rate(lambda: a @ b, 2 * n ** 3, device, reps)


def conv_peak(dtype, device, reps=10):
    """FLOP/s of a large 3x3 convolution (16 x 256 channels x 32², channels_last: the kernels the methods' own
    convolutions use; on some CPUs, e.g. AMD's, these run far faster than the float32 matrix product)."""
    x = torch.randn(16, 256, 32, 32, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    return _best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 16 * 256 * 256 * 9 * 32 * 32,
                      device, reps)


def _best_rate(fn, flops, device, reps):
    best = float("inf")
    for i in range(reps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t)
    return flops / best


def measure_peak(a):
    """The machine's peak per dtype: the better of the matrix product and the convolution (each recorded)."""
    kernels = {dt: {"matmul": matmul_peak(a.peak_n, getattr(torch, dt), a.device),
                    "conv3x3": conv_peak(getattr(torch, dt), a.device)} for dt in ("float32", "bfloat16")}
    return {dt: max(k.values()) for dt, k in kernels.items()}, kernels


def run_method(m, tmp, teacher, a, flags, name, root=ROOT):
    """One short run of method m with `flags` (a list), from the scripts in `root`; its last (student) epoch's seconds
    per iteration, or the run's last error line (a string) if it failed."""
    b = PAPER_BATCH[m]
    if m in GENERATOR_METHODS:
        sched = ["--epochs", "3", "--warmup-epochs", "1", "--iters-per-epoch", str(a.iters)]
    else:
        sched = ["--epochs", "3", "--train-subset", str(b * a.iters)]
    args = ["--data-dir", os.path.join(tmp, "data"), "--teacher", teacher, "--batch-size", str(b), "--device",
            a.device, "--threads", str(a.threads), "--out-dir", tmp, *sched, *METHOD_ARGS.get(m, lambda b: [])(b),
            *flags, "--run-name", name]
    r = subprocess.run([sys.executable, f"{m}.py", *args], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "CLEANQD_OFFLINE": "1"})
    if r.returncode:
        return f"{m} {' '.join(flags)} failed: {r.stderr.strip().splitlines()[-1]}"
    with open(os.path.join(tmp, name, "metrics.jsonl")) as f:
        return b / [json.loads(line) for line in f][-1]["charts/images_per_s"]


def side_by_side(a):
    """Eager against each flag set, per method: in every round each configuration runs once, back to back, in an
    order rotated by one from the previous round, so that a slow spell of a shared machine falls on all of them. The
    ratio of a round is eager's time over the flag set's in that round; medians and min-max over the rounds.
    --baseline-root DIR: one more configuration, "baseline", eager from DIR's scripts (another checkout of the
    project: an older commit), so that its ratio is what this checkout's code changes gained."""
    import statistics
    configs = [("eager", [])] + [(f.strip(), f.split()) for f in a.flag_sets.split(";") if f.strip()]
    if a.baseline_root:
        configs.append(("baseline", []))
        git = subprocess.run(["git", "-C", a.baseline_root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True)
    res = {"machine": {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "device": a.device, "torch": torch.__version__, "python": platform.python_version(),
                       "threads": a.threads or torch.get_num_threads()},
           "iters": a.iters, "rounds": a.rounds, "date": time.strftime("%Y-%m-%d"), "methods": {}}
    if a.baseline_root:
        res["baseline"] = {"root": a.baseline_root, "commit": git.stdout.strip() or None}
    with tempfile.TemporaryDirectory() as tmp:
        write_data(os.path.join(tmp, "data"), n_train=max(PAPER_BATCH.values()) * a.iters)
        teacher = os.path.join(tmp, "teacher.pth")
        torch.save(CifarResNet(20, 10).state_dict(), teacher)
        for m in a.methods:
            times, errors = {c: [] for c, _ in configs}, {}
            for r in range(a.rounds):
                for k in range(len(configs)):
                    c, flags = configs[(k + r) % len(configs)]
                    t = run_method(m, tmp, teacher, a, flags, f"{m}_{r}_{k}",
                                   a.baseline_root if c == "baseline" else ROOT)
                    if isinstance(t, str):
                        errors[c] = t
                        print(f"error: {t}", flush=True)
                    else:
                        times[c].append(t)
            out = {"batch": PAPER_BATCH[m], "s_per_iter": {}, "speedup": {}, "errors": errors}
            for c, _ in configs:
                ts = times[c]
                if len(ts) < a.rounds or len(times["eager"]) < a.rounds:
                    continue
                out["s_per_iter"][c] = {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "all": ts}
                if c == "baseline":  # what this checkout gained: the baseline's time over eager's
                    ratios = [t / e for e, t in zip(times["eager"], ts)]
                    out["speedup_over_baseline"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                    "max": max(ratios)}
                elif c != "eager":
                    ratios = [e / t for e, t in zip(times["eager"], ts)]
                    out["speedup"][c] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            res["methods"][m] = out
            if "eager" in out["s_per_iter"]:
                print(f"{m:6s} eager {out['s_per_iter']['eager']['median']:.3f} s/iter" + "".join(
                    f"; {c}: x{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})" for c, v in out["speedup"].items()) + (
                    "; over the baseline: x{median:.2f} ({min:.2f}-{max:.2f})".format(**out["speedup_over_baseline"])
                    if "speedup_over_baseline" in out else ""), flush=True)
            if a.json:  # after every method: a long measurement keeps what it has
                with open(a.json, "w") as f:
                    json.dump(res, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=list(PAPER_BATCH), choices=list(PAPER_BATCH))
    p.add_argument("--iters", type=int, default=4, help="iterations per timed epoch")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("--extra", default="", help="flags added to every script's command, e.g. --extra=--compile (with =)")
    p.add_argument("--peak-n", type=int, default=2048, help="size of the square matrix product that measures peak")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP counts (the roofline)")
    p.add_argument("--breakdown", action="store_true", help="also profile where each iteration's time goes")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--side-by-side", action="store_true",
                   help="instead: each method eager against each of --flag-sets, back-to-back in every round (the "
                        "order rotated from round to round), medians and min-max over --rounds")
    p.add_argument("--flag-sets", default="--compile;--amp bf16;--compile --amp bf16",
                   help="--side-by-side: the flag sets compared with eager, separated by ';'")
    p.add_argument("--rounds", type=int, default=3, help="--side-by-side: rounds")
    p.add_argument("--baseline-root", default=None, metavar="DIR",
                   help="--side-by-side: also run eager from DIR's scripts (e.g. a `git worktree` of an older commit) "
                        "and report this checkout's speedup over it")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.side_by_side:
        return side_by_side(a)
    res = {"machine": {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "device": a.device, "torch": torch.__version__, "python": platform.python_version(),
                       "threads": a.threads or torch.get_num_threads(),
                       "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None},
           "iters": a.iters, "extra": a.extra, "date": time.strftime("%Y-%m-%d")}
    res["peak_flops"], res["peak_kernels"] = measure_peak(a)
    peak = res["peak_flops"]
    print(f"peak (the better of a {a.peak_n}^2 matmul and a 3x3 conv, {res['machine']['threads']} threads): " +
          ", ".join(
        f"{dt} {peak[dt] / 1e9:.0f} GFLOP/s (matmul {k['matmul'] / 1e9:.0f}, conv {k['conv3x3'] / 1e9:.0f})"
        for dt, k in res["peak_kernels"].items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_data(os.path.join(tmp, "data"), n_train=max(PAPER_BATCH.values()) * a.iters)
        teacher = os.path.join(tmp, "teacher.pth")
        torch.save(CifarResNet(20, 10).state_dict(), teacher)
        failed = []
        for m in a.methods:
            b = PAPER_BATCH[m]
            if m in GENERATOR_METHODS:
                sched = ["--epochs", "3", "--warmup-epochs", "1", "--iters-per-epoch", str(a.iters)]
            else:
                sched = ["--epochs", "3", "--train-subset", str(b * a.iters)]
            args = ["--data-dir", os.path.join(tmp, "data"), "--teacher", teacher, "--batch-size", str(b),
                    "--device", a.device, "--threads", str(a.threads), "--out-dir", tmp, *sched,
                    *METHOD_ARGS.get(m, lambda b: [])(b), *a.extra.split()]
            env = {**os.environ, "CLEANQD_OFFLINE": "1"}
            r = subprocess.run([sys.executable, f"{m}.py", *args, "--run-name", m], cwd=ROOT, capture_output=True,
                               text=True, env=env)
            if r.returncode:
                failed.append(f"error: {m} failed: {r.stderr.strip().splitlines()[-1]}")
                print(failed[-1], flush=True)
                continue
            with open(os.path.join(tmp, m, "metrics.jsonl")) as f:
                ips = [json.loads(line) for line in f][-1]["charts/images_per_s"]
            res[m] = {"batch": b, "s_per_iter": b / ips, "images_per_s": ips}
            line = f"{m:6s} batch {b:3d}: {b / ips:.3f} s/iter ({ips:.0f} images/s)"
            if not a.no_flops:
                fc = [sys.executable, os.path.join("benchmarks", "flop_count.py"), f"{m}.py", *args, "--iters-per-epoch"
                      if m in GENERATOR_METHODS else "--train-subset", str(2 if m in GENERATOR_METHODS else 2 * b),
                      "--epochs", "2", "--run-name", m + "_flops"]
                fc = [x for x in fc if x != "--compile"]  # counted eagerly: the same operations
                r = subprocess.run(fc, cwd=ROOT, capture_output=True, text=True, env=env)
                if r.returncode:
                    failed.append(f"error: counting {m}'s FLOPs failed: {r.stderr.strip().splitlines()[-1]}")
                    print(failed[-1], flush=True)
                    continue
                flops = json.loads(r.stdout.strip().splitlines()[-1])["flops_per_iter"]
                achieved = flops * ips / b
                res[m].update(flops_per_iter=flops, achieved_flops=achieved,
                              fraction_of_fp32_peak=achieved / peak["float32"],
                              fraction_of_bf16_peak=achieved / peak["bfloat16"])
                line += (f", {flops / 1e9:.1f} GFLOP/iter, {achieved / 1e9:.1f} GFLOP/s = "
                         f"{100 * achieved / peak['float32']:.0f} % of the float32 peak, "
                         f"{100 * achieved / peak['bfloat16']:.0f} % of the bfloat16 one")
            if a.breakdown:
                pr = [sys.executable, os.path.join("benchmarks", "flop_count.py"), "--profile", f"{m}.py", *args,
                      "--run-name", m + "_profile"]
                r = subprocess.run(pr, cwd=ROOT, capture_output=True, text=True, env=env)
                if r.returncode:
                    failed.append(f"error: profiling {m} failed: {r.stderr.strip().splitlines()[-1]}")
                    print(failed[-1], flush=True)
                    continue
                prof = json.loads(r.stdout.strip().splitlines()[-1])
                parts, total = prof["s_per_iter_by_part"], prof["s_per_iter_profiled"]
                top = prof["top_other_operators_s_per_iter"]
                res[m].update(profiled_s_per_iter=total, s_per_iter_by_part=parts, top_other_operators_s_per_iter=top)
                line += "\n       time: " + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in parts.items())
                conv = parts.get("convolutions and matrix products", 0.0)
                if not a.no_flops and conv:
                    res[m]["conv_flops_per_s"] = res[m]["flops_per_iter"] / conv
                    line += (f"; the convolutions alone run at {res[m]['flops_per_iter'] / conv / 1e9:.0f} GFLOP/s = "
                             f"{100 * res[m]['flops_per_iter'] / conv / peak['float32']:.0f} % of the float32 peak")
                line += "\n       most of the other operators: " + ", ".join(
                    f"{k} {100 * v / total:.0f} %" for k, v in list(top.items())[:4])
            print(line + f" on {a.device}", flush=True)
    again, _ = measure_peak(a)  # the peak again, after the methods: the better measurement is the peak
    for dt in ("float32", "bfloat16"):
        peak[dt] = max(peak[dt], again[dt])
    print(f"peak, the better of before and after: float32 {peak['float32'] / 1e9:.0f} GFLOP/s, bfloat16 "
          f"{peak['bfloat16'] / 1e9:.0f} GFLOP/s; against it:")
    for m in a.methods:
        if "achieved_flops" in res.get(m, {}):
            r = res[m]
            r.update(fraction_of_fp32_peak=r["achieved_flops"] / peak["float32"],
                     fraction_of_bf16_peak=r["achieved_flops"] / peak["bfloat16"])
            conv = f", the convolutions alone {100 * r['conv_flops_per_s'] / peak['float32']:.0f} %" \
                if "conv_flops_per_s" in r else ""
            print(f"{m:6s} {100 * r['fraction_of_fp32_peak']:.0f} % of the float32 peak{conv}")
    print(json.dumps(res["machine"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    if failed:
        sys.exit("\n".join(failed))


if __name__ == "__main__":
    main()
