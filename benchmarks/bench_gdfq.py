"""Speed benchmark (not a test) of our GDFQ on one machine: one training iteration with quantization on vs off,
where its time goes (generator, teacher, student, optimizer steps), the student's forward+backward alone, AIT's
gradient-inundation step, and a 10k-image test-set evaluation vs the bare forward pass.

    python benchmarks/bench_gdfq.py --batch-sizes 64 200 --iters 5 --json bench.json

Absolute figures only, with the machine they came from; speed-ups against the reference code are measured side by
side in one process by benchmarks/bench_vs_reference.py. Targets: quantized student fwd+bwd <= 1.3x the float one;
evaluation <= 1.1x the bare forward pass.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import CifarResNet, cpu_model, evaluate, keep_freed_memory, quantize_model, set_calibrating  # noqa: E402
from gdfq import BNStatsLoss, Generator, kd_loss  # noqa: E402


def timeit(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]  # median


def gdfq_iteration(teacher, student, generator, bns, opt_g, opt_s, batch, num_classes=10):
    z = torch.randn(batch, 100)
    y = torch.randint(0, num_classes, (batch,))
    x = generator(z, y)
    bns.active = True
    t = teacher(x)
    bns.active = False
    loss_g = F.cross_entropy(t, y) + 0.1 * bns()
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    s = student(x.detach())
    loss_s = kd_loss(s, t.detach(), 20.0) + F.cross_entropy(s, y)
    opt_s.zero_grad(set_to_none=True)
    loss_s.backward()
    opt_s.step()


def parts(teacher, student, batch, iters, num_classes=10):
    """Median seconds of each part of a GDFQ iteration (CPU work is synchronous, so the clock splits it)."""
    gen, bns = Generator(num_classes).train(), BNStatsLoss(teacher)
    opt_g = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), 1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4)
    times = {k: [] for k in ("generator_fwd", "teacher_fwd_bns", "g_backward", "g_step", "student_fwd",
                             "student_bwd", "s_step")}
    for i in range(iters + 2):  # the first two are warm-up
        t = [time.perf_counter()]
        z, y = torch.randn(batch, 100), torch.randint(0, num_classes, (batch,))
        x = gen(z, y)
        t.append(time.perf_counter())
        bns.active = True
        tl = teacher(x)
        bns.active = False
        loss_g = F.cross_entropy(tl, y) + 0.1 * bns()
        t.append(time.perf_counter())
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()  # through the teacher (inputs only: its weights need no gradient) and the generator
        t.append(time.perf_counter())
        opt_g.step()
        t.append(time.perf_counter())
        s = student(x.detach())
        loss_s = kd_loss(s, tl.detach(), 20.0) + F.cross_entropy(s, y)
        t.append(time.perf_counter())
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        t.append(time.perf_counter())
        opt_s.step()
        t.append(time.perf_counter())
        if i >= 2:
            for k, a, b in zip(times, t, t[1:]):
                times[k].append(b - a)
    for h in [m for m in teacher.modules()]:
        h._forward_hooks.clear()
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 200])
    p.add_argument("--iters", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()  # glibc's malloc as the scripts set it on a CPU (common.setup)
    torch.manual_seed(0)
    teacher = CifarResNet(20, 10).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    res = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(), "bits": a.bits}
    for b in a.batch_sizes:
        x = torch.randn(b, 3, 32, 32)
        for quant in (False, True):
            student = (quantize_model(teacher, a.bits, a.bits) if quant else CifarResNet(20, 10)).eval()
            student = student.to(memory_format=torch.channels_last)  # same layout for both
            student.load_state_dict(teacher.state_dict(), strict=False)
            student.requires_grad_(True)
            if quant:
                set_calibrating(student, False)
                with torch.no_grad():  # initialise the ranges once
                    set_calibrating(student, True)
                    student(x)
                    set_calibrating(student, False)
            tag = "quant" if quant else "float"

            def fwd_bwd():
                student(x).sum().backward()
            res[f"student_fwd_bwd_b{b}_{tag}_s"] = timeit(fwd_bwd, a.iters)
            gen = Generator(10).train()
            bns = BNStatsLoss(teacher)
            opt_g = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.999))
            opt_s = torch.optim.SGD(student.parameters(), 1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4)
            res[f"iter_b{b}_{tag}_s"] = timeit(lambda: gdfq_iteration(teacher, student, gen, bns, opt_g, opt_s, b),
                                               a.iters)
            for h in [m for m in teacher.modules()]:
                h._forward_hooks.clear()
            res.update({f"parts_b{b}_{tag}_{k}": v for k, v in parts(teacher, student, b, a.iters).items()})
        res[f"student_fwd_bwd_b{b}_ratio"] = res[f"student_fwd_bwd_b{b}_quant_s"] / res[f"student_fwd_bwd_b{b}_float_s"]
        res[f"iter_b{b}_ratio"] = res[f"iter_b{b}_quant_s"] / res[f"iter_b{b}_float_s"]

    # AIT: gradient inundation's optimizer step vs plain Nesterov SGD on the same student gradients
    from ait import GradientInundation
    from common import QConv2d, QLinear
    student = quantize_model(teacher, a.bits, a.bits).requires_grad_(True).eval()
    x = torch.randn(64, 3, 32, 32)
    student(x)
    set_calibrating(student, False)
    student(x).logsumexp(1).mean().backward()
    qweights = [m.weight for m in student.modules() if isinstance(m, (QConv2d, QLinear))]
    gi = GradientInundation(qweights, 1e-4, a.bits, 1e-3)
    sgd = torch.optim.SGD(qweights, 1e-4, momentum=0.9, nesterov=True)
    res["ait_gi_step_s"] = timeit(gi.step, a.iters)
    res["ait_gi_mean_alpha"] = sum(gi.last_alphas) / len(gi.last_alphas)
    res["ait_sgd_step_s"] = timeit(sgd.step, a.iters)

    # evaluation of the quantized student on 10k images vs the bare forward pass over the same batches
    student = quantize_model(teacher, a.bits, a.bits).eval()
    xs = torch.randn(10000, 3, 32, 32)
    ys = torch.randint(0, 10, (10000,))
    with torch.no_grad():
        student(xs[:500])
    set_calibrating(student, False)

    @torch.no_grad()
    def bare():
        for i in range(0, 10000, 100):
            student(xs[i:i + 100])
    res["forward_10k_s"] = timeit(bare, 2, warmup=1)
    res["eval_10k_s"] = timeit(lambda: evaluate(student, xs, ys), 2, warmup=1)
    res["eval_overhead_ratio"] = res["eval_10k_s"] / res["forward_10k_s"]
    for k, v in res.items():
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
