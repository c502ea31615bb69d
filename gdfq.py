"""GDFQ: Generative Low-bitwidth Data Free Quantization (Xu et al., ECCV 2020, arXiv 2003.03603).

Reference code: github.com/xushoukai/GDFQ (main.py: Generator and loop, trainer.py: losses).
Idea: a conditional generator learns to produce images that the FP teacher classifies as their label (CE) and
whose BatchNorm input statistics match the teacher's running statistics (BNS); the quantized student is
distilled from the teacher on those images. Docs: docs/gdfq.md.

    python gdfq.py --dataset cifar10 --wbits 4
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ArgumentParser, Progress, UpsampleConv3x3, accelerate, add_common_args, at_least,
                    batch_stats, check_warmup, full_precision, lr_milestones, method_name, parse_args, quantize_model,
                    set_calibrating, set_lr, setup)

METHOD = method_name(__file__)  # the name of the runs: a renamed copy of this file is a new method
# How run_all.sh and tools/report.py place this method: its kind (which budget it gets), the bit-widths it runs by
# default and the ones it supports (W = A), the paper's year (table order) and its published numbers, which belong
# to "paper_for": a copy under a new name shows none of them until you set your own paper_for and numbers.
GRID = {"kind": "zero-shot", "bits": [3, 4, 5], "supported_bits": [2, 3, 4, 5, 6, 7, 8], "year": 2020,
        "paper_for": "gdfq",  # the published numbers below are gdfq's: a renamed copy shows none of them
        "paper": {"cifar10 W3A3": [75.11, "GDFQ re-run by AdaDFQ"], "cifar10 W4A4": [90.25, "GDFQ paper"],
                  "cifar10 W5A5": [93.38, "GDFQ paper"], "cifar100 W3A3": [47.61, "GDFQ re-run by AdaDFQ"],
                  "cifar100 W4A4": [63.39, "GDFQ paper"], "cifar100 W5A5": [66.12, "GDFQ paper"],
                  "imagenet resnet18 W4A4": [60.60, "GDFQ README (pytorchcv ResNet-18 teacher, 71.47)"]}}

# The ImageNet recipe (reference: imagenet_resnet18.hocon, main.py), the defaults of the flags not given with
# --dataset imagenet; every other flag keeps its CIFAR default, as the reference's does
IMAGENET = {"batch_size": 16, "warmup_epochs": 50, "calib_epochs": 4, "lr_s": 1e-6}


def variant(args):
    """The grid's label of a run (its args.json as a dict): flags that change the algorithm make a variant."""
    return METHOD


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, METHOD, datasets=("cifar10", "cifar100", "imagenet"))
    p.add_argument("--epochs", type=at_least(0), default=400,
                   help="total epochs, warm-up included (0: evaluate the teacher)")
    p.add_argument("--warmup-epochs", type=int, default=4,
                   help="epochs in which only the generator trains and the activation ranges calibrate")
    p.add_argument("--calib-epochs", type=int, default=None,
                   help="the first epochs, within the warm-up, in which the activation ranges calibrate (default: the "
                        "whole warm-up; the reference calibrates in epochs 1-4 whatever its warm-up)")
    p.add_argument("--iters-per-epoch", type=at_least(1), default=200, help="iterations per epoch")
    p.add_argument("--batch-size", type=at_least(1), default=200, help="generated images per iteration")
    p.add_argument("--lr-s", type=float, default=1e-4, help="student learning rate (SGD, Nesterov)")
    p.add_argument("--lr-g", type=float, default=1e-3, help="generator learning rate (Adam, betas 0.5/0.999)")
    p.add_argument("--momentum", type=float, default=0.9, help="student SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="student weight decay")
    p.add_argument("--milestones", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                   help="lr x0.1 points, as fractions of the schedule (see --milestones-from)")
    p.add_argument("--milestones-from", default="all", choices=["all", "train"],
                   help="'all': fractions of --epochs (paper: 100/200/300 of 400); "
                        "'train': fractions of the post-warm-up epochs, offset by the warm-up (for short runs)")
    p.add_argument("--temperature", type=float, default=20.0, help="KD temperature")
    p.add_argument("--kl-reduction", default="mean", choices=["mean", "batchmean"],
                   help="KLDivLoss reduction: 'mean' (reference: averages over B*C) or 'batchmean' (true KL)")
    p.add_argument("--bns-weight", type=float, default=0.1, help="weight of the BNS loss in the generator loss")
    p.add_argument("--ce-weight", type=float, default=1.0,
                   help="weight of the student's CE on the generator's labels (paper: 1; 0 = KD only, an ablation)")
    p.add_argument("--latent-dim", type=int, default=100, help="generator noise dimension")
    p.add_argument("--act-ema", default="plain", choices=["plain", "reference"],
                   help="activation-range calibration: a plain EMA of the batch min/max, or the reference code's "
                        "bias-corrected one, which inflates the ranges for the first ~150 updates")
    args = parse_args(p, argv, dataset_defaults={"imagenet": IMAGENET})
    if args.calib_epochs is not None and args.calib_epochs > args.warmup_epochs > 0:  # a shorter warm-up bounds it
        print(f"note: the activation ranges calibrate in the {args.warmup_epochs} warm-up epochs "
              f"(--calib-epochs {args.calib_epochs} is longer than the warm-up)")
    if args.calib_epochs is None or args.calib_epochs > args.warmup_epochs > 0:
        args.calib_epochs = args.warmup_epochs
    check_warmup(args.epochs, args.warmup_epochs, args.calib_epochs)
    return args


def build_student(args, teacher):
    """The quantized student: a copy of the teacher, every conv/FC weight per-channel k-bit and every ReLU a
    calibrated k-bit activation quantizer (common.quantize_model); trained in eval mode (BN statistics frozen)."""
    return quantize_model(teacher, args.wbits, args.abits, args.act_ema).requires_grad_(True).eval()


# ALGO LOGIC: the GDFQ conditional generator
class Generator(nn.Module):
    def __init__(self, num_classes, latent_dim=100, img_size=32):
        super().__init__()
        self.init_size = img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        # BatchNorm2d(C, 0.8): the reference passes 0.8 as eps (positional); kept, it shaped the published numbers
        # UpsampleConv3x3 = Upsample(x2, nearest) -> Conv3x3, computed with ~2x fewer FLOPs (see common.py)
        self.block1 = nn.Sequential(UpsampleConv3x3(128, 128), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(UpsampleConv3x3(128, 64), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
                                    nn.Conv2d(64, 3, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(3, affine=False))

    def forward(self, z, y):
        h = self.l1(self.label_emb(y) * z).view(-1, 128, self.init_size, self.init_size)
        return self.block2(self.block1(self.bn0(h)))


# ALGO LOGIC: the ImageNet generator (the reference's Generator_imagenet): the label enters through class-conditional
# BatchNorms (a per-class scale and shift on an affine-free BN) instead of multiplying the noise; 224x224 images
class ConditionalBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_classes, channels, eps=1e-5):
        super().__init__(channels, eps, affine=False)
        self.weights, self.biases = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
        nn.init.ones_(self.weights.weight)
        nn.init.zeros_(self.biases.weight)

    def forward(self, x, y):
        return super().forward(x) * self.weights(y)[:, :, None, None] + self.biases(y)[:, :, None, None]


class GeneratorImageNet(nn.Module):
    def __init__(self, num_classes, latent_dim=100, img_size=224):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = ConditionalBatchNorm2d(num_classes, 128)
        self.conv1, self.bn1 = UpsampleConv3x3(128, 128), ConditionalBatchNorm2d(num_classes, 128, 0.8)  # eps 0.8
        self.conv2, self.bn2 = UpsampleConv3x3(128, 64), ConditionalBatchNorm2d(num_classes, 64, 0.8)
        self.conv3, self.bn3 = nn.Conv2d(64, 3, 3, 1, 1), nn.BatchNorm2d(3, affine=False)

    def forward(self, z, y):
        h = self.bn0(self.l1(z).view(-1, 128, self.init_size, self.init_size), y)
        h = F.leaky_relu(self.bn1(self.conv1(h), y), 0.2)
        h = F.leaky_relu(self.bn2(self.conv2(h), y), 0.2)
        return self.bn3(torch.tanh(self.conv3(h)))



# ALGO LOGIC: BNS loss. Hooks on every teacher BN read the BN input's batch mean/variance.
class BNStatsLoss:
    def __init__(self, teacher):
        self.bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.stats, self.active = [], False
        for bn in self.bns:
            bn.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active:  # batch mean and biased variance (common.py: around the running mean, one-pass backward)
            self.stats.append((module, *batch_stats(full_precision(inputs[0]), module.running_mean)))

    def __call__(self):
        """mean over BN layers of MSE(batch mean, running_mean) + MSE(batch var, running_var); clears stats."""
        loss = sum(F.mse_loss(m, bn.running_mean) + F.mse_loss(v, bn.running_var) for bn, m, v in self.stats)
        loss = loss / len(self.stats)
        self.stats = []
        return loss


# ALGO LOGIC: student distillation loss (reference: KLDivLoss with PyTorch's default 'mean' reduction)
def kd_loss(s_logits, t_logits, temperature, reduction="mean"):
    T = temperature
    kl = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="none")
    return (kl.mean() if reduction == "mean" else kl.sum() / len(kl)) * T * T  # 'mean': over B*C elements


def student_loss(s_logits, t_logits, y, temperature, reduction="mean", ce_weight=1.0):
    """KD(T) + ce_weight * CE(student, generator label y); the paper uses ce_weight = 1."""
    return kd_loss(s_logits, t_logits, temperature, reduction) + ce_weight * F.cross_entropy(s_logits, y)


if __name__ == "__main__":
    args = parse()
    teacher, info, test, run, teacher_top1 = setup(args, evaluate_only=args.epochs == 0)  # --epochs 0: teacher only
    device, num_classes = torch.device(args.device), NUM_CLASSES[args.dataset]

    student = build_student(args, teacher)
    generator = (GeneratorImageNet if args.dataset == "imagenet" else Generator)(
        num_classes, args.latent_dim).to(device).train()
    bns_loss = BNStatsLoss(teacher)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), lr=args.lr_s, momentum=args.momentum, nesterov=True,
                            weight_decay=args.weight_decay)
    milestones = lr_milestones(args.epochs, args.warmup_epochs, args.milestones, args.milestones_from)
    progress = Progress(args, run, test, teacher_top1,  # resumes all of these from the checkpoint with --resume
                        {"student": student, "generator": generator, "opt_s": opt_s, "opt_g": opt_g})
    accelerate(args, teacher, student, generator)  # --amp bf16 / --compile, in place (common.py); off by default

    for epoch in range(progress.start_epoch, args.epochs):
        warmup = epoch < args.warmup_epochs
        set_calibrating(student, epoch < args.calib_epochs)  # ranges follow the generated data in the warm-up only
        factor = 0.1 ** sum(epoch >= m for m in milestones)
        set_lr(opt_g, args.lr_g * factor)
        set_lr(opt_s, args.lr_s * factor)
        for _ in progress.iterate(epoch, range(args.iters_per_epoch), args.iters_per_epoch):
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            y = torch.randint(0, num_classes, (args.batch_size,), device=device)

            # ALGO LOGIC: generator step: CE(teacher(x), y) + 0.1 * BNS
            x = generator(z, y)
            bns_loss.active = True
            t_logits = teacher(x)
            bns_loss.active = False
            ce_g = F.cross_entropy(t_logits, y)
            bns = bns_loss()
            loss_g = ce_g + args.bns_weight * bns
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            progress.add("losses/loss_G", loss_g)  # logged as epoch means; summed on the device, no host sync
            progress.add("losses/ce_G", ce_g)
            progress.add("losses/bns", bns)

            # ALGO LOGIC: student step on the same (detached) images: KD(T=20) + CE; no update during warm-up
            t_logits = t_logits.detach()
            with torch.set_grad_enabled(not warmup):
                s_logits = student(x.detach())
                loss_s = student_loss(s_logits, t_logits, y, args.temperature, args.kl_reduction, args.ce_weight)
            if not warmup:
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
            progress.add("losses/loss_S", loss_s)
            progress.add("charts/teacher_acc_gen", (t_logits.argmax(1) == y).float().mean() * 100)  # on generated

        progress.end_epoch(epoch, student, {"lr_S": args.lr_s * factor, "lr_G": args.lr_g * factor},
                           args.iters_per_epoch * args.batch_size, warmup,
                           calibration_done=epoch == args.calib_epochs - 1)

    progress.finish(student, args.teacher_depth, num_classes, {  # what makes this run's cell comparable
        "quantizer": "zeroq: weights per output channel (min/max), activations per tensor (calibrated in the warm-up, "
                     "then fixed and clamped)", "activation_ranges": f"{args.act_ema} EMA",
        "train_data": "generated", "iterations": args.epochs * args.iters_per_epoch, "batch": args.batch_size,
        "teacher_passes_per_iteration": "1 forward, 1 backward (to the generator)"})
