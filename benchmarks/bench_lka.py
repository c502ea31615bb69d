"""LKA block forward+backward on CPU: lrq.py's DilatedDepthwiseConv vs PyTorch's dilated depthwise conv.

    python benchmarks/bench_lka.py --threads 1 --iters 3
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lrq import LKABlock  # noqa: E402


def fwd_bwd_seconds(block, x, iters):
    for _ in range(2):
        block(x).sum().backward()
    t = time.perf_counter()
    for _ in range(iters):
        block(x).sum().backward()
    return (time.perf_counter() - t) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for c, hw in ((128, 16), (64, 32)):  # the generator's two LKA blocks
        block = LKABlock(c)
        plain = torch.nn.Conv2d(c, c, 7, padding=9, dilation=3, groups=c)
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(a.batch_size, c, hw, hw).contiguous(memory_format=fmt).requires_grad_(True)
            folded = fwd_bwd_seconds(block, x, a.iters)
            fast = block.lka.dw_dilated
            plain.load_state_dict(fast.state_dict())
            block.lka.dw_dilated = plain
            ref = fwd_bwd_seconds(block, x, a.iters)
            block.lka.dw_dilated = fast
            name = "channels_last" if fmt is torch.channels_last else "contiguous"
            print(f"LKA {c} ch {hw}x{hw} {name}: dilated conv {ref:.3f} s, folded {folded:.3f} s, {ref / folded:.2f}x")


if __name__ == "__main__":
    main()
