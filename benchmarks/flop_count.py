"""FLOPs of one training iteration of a cleanqd script (not a test), counted by torch.utils.flop_counter.

    python benchmarks/flop_count.py gdfq.py --batch-size 200 --epochs 2 --warmup-epochs 1 --iters-per-epoch 2 ...

Runs the script as `python SCRIPT ARGS` would, in this process, and counts the operations of the iterations of its
last epoch (a training epoch: generator and student steps, forward and backward, whatever the method does per
iteration; the evaluation after the epoch is not counted) with FlopCounterMode, which counts matrix products and
convolutions (2 FLOPs per multiply-add), not pointwise work. Prints one JSON line: FLOPs per iteration, in total and
per operator, and the iterations counted.
"""
import json
import os
import runpy
import sys

from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import common  # noqa: E402


def main():
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit("usage: python benchmarks/flop_count.py SCRIPT.py [its flags]")
    script, counted = os.path.join(ROOT, sys.argv[1]) if not os.path.isabs(sys.argv[1]) else sys.argv[1], {}
    iterate = common.Progress.iterate

    def counting_iterate(self, epoch, iterable, total):  # the last epoch's iterations run under the counter
        if epoch != self.args.epochs - 1:
            yield from iterate(self, epoch, iterable, total)
            return
        mode = FlopCounterMode(display=False)
        with mode:
            n = 0
            for item in iterate(self, epoch, iterable, total):
                yield item
                n += 1
        counted.update(iterations=n, total=mode.get_total_flops(),
                       by_op={str(k): v for k, v in mode.get_flop_counts()["Global"].items()})

    common.Progress.iterate = counting_iterate
    sys.argv = [script] + sys.argv[2:]
    sys.stdout, out = sys.stderr, sys.stdout  # the script's console lines go to stderr, the figure to stdout
    runpy.run_path(script, run_name="__main__")
    sys.stdout = out
    n = counted["iterations"]
    print(json.dumps({"script": os.path.basename(script), "iterations": n, "flops_per_iter": counted["total"] / n,
                      "by_op_per_iter": {k: v / n for k, v in counted["by_op"].items()}}))


if __name__ == "__main__":
    main()
