"""Side-by-side speed (not a test): the official GDFQ code's training iteration and test pass against ours, timed
alternately in one process on the same machine, same threads.

    git clone https://github.com/xushoukai/GDFQ /tmp/gdfq     # the reference, outside this repository
    pip install pyhocon termcolor                              # its options.py and utils import them
    python benchmarks/bench_vs_reference.py --reference /tmp/gdfq --data-dir ./data --threads 2 --json out.json

Nothing of the reference is copied or changed: it is imported from --reference, and only the environment is
patched in memory so that it runs on a CPU: `.cuda()` returns its tensor / module unchanged, torch reports one GPU
(the reference asserts it), torchvision's CIFAR-10 skips its MD5 check (copies of the data whose bytes differ from
the official archive load), the `range` its trainer iterates with yields --iters instead of its hard-coded 200,
and its top-k accuracy helper (`utils/compute.py: accuracy`) is replaced by the same operations with `.reshape`
where it calls `.view` on a non-contiguous tensor, which current PyTorch rejects. One reference "iteration" is the
body of its `Trainer.train` loop: generator step (CE + 0.1·BNS, BN hooks),
student step (KL + CE, Nesterov SGD) and its per-iteration bookkeeping (accuracies copied to the host); ours is
`gdfq.py`'s loop body. Both use W4A4 students, CIFAR-10 ResNet-20 with random weights (speed does not depend on
them), the reference's hyper-parameters. The test pass is the reference's `Trainer.test` over its own loader
(torchvision CIFAR-10 test split, ToTensor + Normalize per image, batch 200, --ref-workers loader processes)
against ours (`EvalData.top1`: the test split normalised once on the device, batches of 100); our one-time
normalisation is timed separately.

--variants adds our iteration with --compile and/or --amp bf16 (common.accelerate on the same models) to the same
alternation; each variant's first, untimed round (torch.compile's compiling, when on) is reported on its own.

The allocator is switched with the side: our scripts set glibc's malloc to keep freed memory (common.setup on a CPU:
common.keep_freed_memory), so each of our turns runs that way and each reference turn with glibc's defaults, as in a
process of its own.

Per round, each side runs --iters iterations (per-iteration time = their mean) and one test pass; the figures are
the median and the spread (min–max) over --rounds rounds, and the ratio is reference / ours per round.
"""
import argparse
import builtins
import copy
import json
import os
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from common import (CifarResNet, EvalData, accelerate, cpu_model, keep_freed_memory, quantize_model,  # noqa: E402
                    set_calibrating)
from gdfq import BNStatsLoss, Generator, student_loss  # noqa: E402


def load_reference(path, iters, batch, threads):
    """Import the reference with the in-memory CPU patches; returns (trainer, settings)."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.device_count = lambda: 1
    import torchvision
    torchvision.datasets.CIFAR10._check_integrity = lambda self: True
    sys.path.insert(0, path)
    import main as ref_main  # noqa: E402 - the reference's main.py (Generator, ExperimentDesign)
    import trainer as ref_trainer
    import utils as ref_utils
    from pytorchcv.model_provider import get_model
    ref_trainer.range = lambda *a: builtins.range(iters) if a == (200,) else builtins.range(*a)
    import utils.compute as ref_compute

    def accuracy(output, target, topk=(1,)):  # its helper, with reshape where current torch rejects its .view
        with torch.no_grad():
            pred = output.topk(max(topk), 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.size(0)).item()
                    for k in topk]
    ref_compute.accuracy = accuracy
    s = types.SimpleNamespace(nGPU=1, GPU=0, batchSize=batch, latent_dim=100, nClasses=10, img_size=32, channels=3,
                              warmup_epochs=0, temperature=20, alpha=1, momentum=0.9, weightDecay=1e-4, lr_G=1e-3,
                              b1=0.5, b2=0.999, nEpochs=400, qw=4, qa=4, lr_S=1e-4)
    teacher = get_model("resnet20_cifar10", pretrained=False).eval()
    design = ref_main.ExperimentDesign.__new__(ref_main.ExperimentDesign)  # only its model helpers are used
    design.settings = s
    student = design.quantize_model(copy.deepcopy(teacher))
    with torch.no_grad():  # calibrate the activation ranges on one batch, then freeze them (as after its warm-up)
        design.unfreeze_model(student)
        student(torch.randn(batch, 3, 32, 32))
        design.freeze_model(student)
    lr = []
    for base in (s.lr_S, s.lr_G):
        m = ref_utils.LRPolicy(base, s.nEpochs, "multi_step")
        m.set_params({"step": [100, 200, 300], "decay_rate": 0.1})
        lr.append(m)
    trainer = ref_trainer.Trainer(model=student, model_teacher=teacher, generator=ref_main.Generator(s),
                                  lr_master_S=lr[0], lr_master_G=lr[1], train_loader=None, test_loader=None,
                                  settings=s, logger=None)
    return trainer, s


def reference_test_loader(path, data_dir, workers):
    sys.path.insert(0, path)
    from dataloader import DataLoader as RefLoader
    loader = RefLoader.__new__(RefLoader)  # its cifar() needs only these attributes
    loader.dataset, loader.dataset_root, loader.n_threads = "cifar10", data_dir, workers
    return loader.cifar("cifar10")[1]


VARIANTS = {"eager": {}, "compile": {"compile": True}, "bf16": {"amp": "bf16"},
            "compile+bf16": {"compile": True, "amp": "bf16"}}


class Ours:
    """gdfq.py's loop body at the same settings; `variant` names the --compile / --amp flags it runs with."""

    def __init__(self, batch, variant="eager"):
        self.batch = batch
        self.teacher = CifarResNet(20, 10).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.student = quantize_model(self.teacher, 4, 4).requires_grad_(True).eval()
        with torch.no_grad():
            self.student(torch.randn(batch, 3, 32, 32))
        set_calibrating(self.student, False)
        self.gen = Generator(10).train()
        self.bns = BNStatsLoss(self.teacher)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), 1e-3, betas=(0.5, 0.999))
        self.opt_s = torch.optim.SGD(self.student.parameters(), 1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4)
        self.sums = torch.zeros(4)
        flags = {"device": "cpu", "compile": False, "amp": "off", **VARIANTS[variant]}
        accelerate(types.SimpleNamespace(**flags), self.teacher, self.student, self.gen)

    def iteration(self):
        z, y = torch.randn(self.batch, 100), torch.randint(0, 10, (self.batch,))
        x = self.gen(z, y)
        self.bns.active = True
        t = self.teacher(x)
        self.bns.active = False
        ce_g, bns = F.cross_entropy(t, y), self.bns()
        loss_g = ce_g + 0.1 * bns
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        s = self.student(x.detach())
        loss_s = student_loss(s, t.detach(), y, 20.0)
        self.opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        self.opt_s.step()
        self.sums += torch.stack([loss_g, ce_g, bns, loss_s]).detach()


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": xs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, help="a checkout of github.com/xushoukai/GDFQ")
    p.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 200])
    p.add_argument("--iters", type=int, default=3, help="iterations per round and side")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (after one untimed warm-up round)")
    p.add_argument("--eval-rounds", type=int, default=3, help="alternating test passes of each side")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both")
    p.add_argument("--ref-workers", type=int, default=0,
                   help="loader processes of the reference's test loader (its configs say 8; 0 = in-process)")
    p.add_argument("--variants", nargs="+", default=["eager"], choices=list(VARIANTS),
                   help="our iteration with these flags (eager: the default; compile: --compile; bf16: --amp bf16), "
                        "each timed in the same alternation")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.reference, "trainer.py")):
        sys.exit(f"error: --reference {a.reference}: no trainer.py there (expected a checkout of xushoukai/GDFQ)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    res = {"machine": {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "python": platform.python_version()}, "iters_per_round": a.iters}
    for b in a.batch_sizes:
        trainer, _ = load_reference(a.reference, a.iters, b, a.threads)
        ours = {v: Ours(b, v) for v in a.variants}
        trainer.train(0)  # warm-up round; epoch 0 also registers its BN hooks (later rounds use epoch 1)
        first = {v: timed(lambda: [o.iteration() for _ in range(a.iters)]) for v, o in ours.items()}  # compiles
        ref_t, our_t = [], {v: [] for v in ours}
        for _ in range(a.rounds):
            keep_freed_memory(False)  # the reference with glibc's defaults, as in a process of its own
            ref_t.append(timed(lambda: trainer.train(1)) / a.iters)
            keep_freed_memory(True)  # ours as our scripts run (common.setup on a CPU)
            for v, o in ours.items():
                our_t[v].append(timed(lambda: [o.iteration() for _ in range(a.iters)]) / a.iters)
        for v in ours:
            key = f"iter_b{b}" if v == "eager" else f"iter_b{b}_{v}"
            res[key] = {"reference_s": summary(ref_t), "ours_s": summary(our_t[v]),
                        "ratio": summary([r / o for r, o in zip(ref_t, our_t[v])]),
                        "ours_first_round_s": first[v]}  # the untimed warm-up round (torch.compile, if on, is here)
            ratios = res[key]["ratio"]["rounds"]
            print(f"batch {b}: reference {statistics.median(ref_t):.3f} s/iter, ours ({v}) "
                  f"{statistics.median(our_t[v]):.3f} s/iter, ratio {statistics.median(ratios):.2f} "
                  f"(rounds {min(ratios):.2f}-{max(ratios):.2f}; first round {first[v]:.1f} s)", flush=True)

    # test pass: the reference's Trainer.test over its loader vs ours over the device-resident test split
    trainer.test_loader = reference_test_loader(a.reference, a.data_dir, a.ref_workers)
    student = quantize_model(CifarResNet(20, 10), 4, 4).eval()
    with torch.no_grad():
        student(torch.randn(200, 3, 32, 32))
    set_calibrating(student, False)
    args = types.SimpleNamespace(dataset="cifar10", data_dir=a.data_dir, eval_norm="teacher", device="cpu")
    info = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)}
    prep = []
    for _ in range(a.eval_rounds):
        t = time.perf_counter()
        test = EvalData(args, info)
        prep.append(time.perf_counter() - t)
    ref_e, our_e = [], []
    for _ in range(a.eval_rounds):
        keep_freed_memory(False)
        ref_e.append(timed(lambda: trainer.test(0)))
        keep_freed_memory(True)
        our_e.append(timed(lambda: test.top1(student)))
    res["eval_10k"] = {"reference_s": summary(ref_e), "ours_s": summary(our_e), "ours_one_time_load_s": summary(prep),
                       "ratio": summary([r / o for r, o in zip(ref_e, our_e)]),
                       "ref_workers": a.ref_workers}
    print(f"test pass: reference {statistics.median(ref_e):.2f} s, ours {statistics.median(our_e):.2f} s "
          f"(+ {statistics.median(prep):.2f} s once to load and normalise), "
          f"ratio {statistics.median(res['eval_10k']['ratio']['rounds']):.2f}", flush=True)
    print(json.dumps(res["machine"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
