"""FLOPs of one training iteration of a cleanqd script (not a test), counted by torch.utils.flop_counter; with
--profile, where the iteration's time goes instead.

    python benchmarks/flop_count.py gdfq.py --batch-size 200 --epochs 2 --warmup-epochs 1 --iters-per-epoch 2 ...
    python benchmarks/flop_count.py --profile gdfq.py --batch-size 200 --epochs 3 --warmup-epochs 1 ...

Runs the script as `python SCRIPT ARGS` would, in this process, and counts the operations of the iterations of its
last epoch (a training epoch: generator and student steps, forward and backward, whatever the method does per
iteration; the evaluation after the epoch is not counted) with FlopCounterMode, which counts matrix products and
convolutions (2 FLOPs per multiply-add), not pointwise work. Prints one JSON line: FLOPs per iteration, in total and
per operator, and the iterations counted.

--profile runs that epoch under torch.profiler (CPU activity) and splits its wall time by the self time of the
operators: convolutions and matrix products (forward and backward), batch norm, everything else the operators do
(pointwise work: quantizers, activations, losses, optimizer updates, copies; under --compile, its fused kernels), and
the rest of the wall time, spent outside any operator (Python, autograd bookkeeping). The profiler's own cost per
operator inflates the small ones, so the split is a guide, not a timing.
"""
import json
import os
import runpy
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import common  # noqa: E402


class GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: its per-module backward hooks break autograd.grad with
    inputs (SynQ's Grad-CAM), and only the global count is used here."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def category(op):
    """The part of an iteration an operator's self time belongs to."""
    name = op.split("::")[-1]
    if "convolution" in name or "conv2d" in name or "conv_depthwise" in name or name in ("addmm", "mm", "bmm",
                                                                                          "baddbmm", "linear"):
        return "convolutions and matrix products"
    if "batch_norm" in name:
        return "batch norm"
    return "other operators"


def main():
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print("usage: python benchmarks/flop_count.py [--profile] SCRIPT.py [its flags]\n\n" + __doc__.strip())
        sys.exit(0)
    profile = sys.argv[1:2] == ["--profile"]
    args = sys.argv[2:] if profile else sys.argv[1:]
    if not args or not args[0].endswith(".py"):
        sys.exit("usage: python benchmarks/flop_count.py [--profile] SCRIPT.py [its flags]")
    script, counted = os.path.join(ROOT, args[0]) if not os.path.isabs(args[0]) else args[0], {}
    iterate = common.Progress.iterate

    def counting_iterate(self, epoch, iterable, total):  # the last epoch's iterations run under the counter
        if epoch != self.args.epochs - 1:
            yield from iterate(self, epoch, iterable, total)
            return
        if profile:
            mode = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        else:
            mode = FlopCounterMode(display=False)
            mode.mod_tracker = GlobalOnly()
        t, n = time.perf_counter(), 0
        with mode:
            for item in iterate(self, epoch, iterable, total):
                yield item
                n += 1
        counted.update(iterations=n, wall=time.perf_counter() - t)
        if profile:
            parts, others = {}, {}
            for e in mode.key_averages():
                parts[category(e.key)] = parts.get(category(e.key), 0.0) + e.self_cpu_time_total / 1e6
                if category(e.key) == "other operators":
                    others[e.key] = e.self_cpu_time_total / 1e6
            counted.update(by_part=parts, top_others=sorted(others.items(), key=lambda kv: -kv[1])[:10])
        else:
            counted.update(total=mode.get_total_flops(),
                           by_op={str(k): v for k, v in mode.get_flop_counts()["Global"].items()})

    common.Progress.iterate = counting_iterate
    sys.argv = [script] + args[1:]
    sys.stdout, out = sys.stderr, sys.stdout  # the script's console lines go to stderr, the figure to stdout
    runpy.run_path(script, run_name="__main__")
    sys.stdout = out
    n, res = counted["iterations"], {"script": os.path.basename(script), "iterations": counted["iterations"]}
    if profile:
        parts = {k: v / n for k, v in counted["by_part"].items()}
        wall = counted["wall"] / n
        parts["outside operators"] = max(0.0, wall - sum(parts.values()))
        res.update(s_per_iter_profiled=wall, s_per_iter_by_part=parts,
                   top_other_operators_s_per_iter={k: v / n for k, v in counted["top_others"]})
    else:
        res.update(flops_per_iter=counted["total"] / n,
                   by_op_per_iter={k: v / n for k, v in counted["by_op"].items()})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
