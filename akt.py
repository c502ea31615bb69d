"""AKT: Advanced Knowledge Transfer: Refined Feature Distillation for Zero-Shot Quantization in Edge Computing
(Hong et al., ACM SAC 2025, arXiv 2412.19125).

Reference code: github.com/Inpyo-Hong/AKT-Advanced-knowledge-Transfer (AKT_main/CIFAR/trainer.py), which is AdaDFQ
(Qian et al., CVPR 2023) plus the refined feature distillation (RFD) term.
Idea: besides the logits, distil the channel and spatial attention of every residual-branch output of the teacher
into the quantized student (RFD), on top of a zero-shot base method (AdaDFQ by default, or GDFQ). Unlike the
released code, whose RFD is always 0, RFD is computed here with the teacher's features for the same images.
Docs: docs/akt.md.

    python akt.py --dataset cifar10 --wbits 3
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ArgumentParser, Progress, UpsampleConv3x3, accelerate, add_common_args, at_least,
                    batch_stats, check_warmup, die, full_precision, lr_milestones, method_name, parse_args,
                    quantize_model, residual_branches, set_calibrating, set_lr, setup)

METHOD = method_name(__file__)  # the name of the runs: a renamed copy of this file is a new method
# How run_all.sh and tools/report.py place this method (see gdfq.py)
GRID = {"kind": "zero-shot", "bits": [3, 4, 5], "supported_bits": [2, 3, 4, 5, 6, 7, 8], "year": 2025,
        "paper_for": "akt",  # the published numbers below are akt's: a renamed copy shows none of them
        "paper": {f"{ds} W{b}A{b}": [v, "AKT paper (AdaDFQ+AKT)"] for ds, b, v in (
            ("cifar10", 3, 86.76), ("cifar10", 4, 92.64), ("cifar10", 5, 93.83), ("cifar100", 3, 54.68),
            ("cifar100", 4, 66.94), ("cifar100", 5, 69.75))},
        "variant_paper": {"gdfq": {f"{ds} W{b}A{b}": [v, "AKT paper (GDFQ+AKT)"] for ds, b, v in (
            ("cifar10", 3, 72.80), ("cifar10", 4, 90.33), ("cifar10", 5, 93.36), ("cifar100", 3, 49.06),
            ("cifar100", 4, 63.37), ("cifar100", 5, 67.46))}}}

# The ImageNet recipe: AKT publishes CIFAR only, so its base's, AdaDFQ's (ImageNet/imagenet_{res18,res50,MV2}.hocon
# and trainer.py), with AKT's RFD on top (our reading); the defaults of the flags not given with --dataset imagenet
IMAGENET = {"epochs": 400, "batch_size": 16, "calib_epochs": 4,
            "warmup_epochs": {"resnet18": 50, "resnet50": 100, "mobilenet_v2": 50},
            "lr_s": {"resnet18": 1e-5, "resnet50": 1e-4, "mobilenet_v2": 1e-5},
            "milestones": {"resnet18": [0.875], "resnet50": [0.375, 0.75], "mobilenet_v2": [0.875]},  # 350; 150, 300
            "temperature": 5.0, "entropy_weight": 25.0,  # AdaDFQ ImageNet: 5 * 5 * entropy(.../ 5)
            "h_low": {"resnet18": 0.1, "resnet50": 0.4, "mobilenet_v2": 0.1}}


def variant(args):
    """The grid's label of a run (its args.json as a dict): flags that change the algorithm make a variant."""
    base = args.get("base", "adadfq")
    return METHOD if base == "adadfq" else f"{METHOD}+{base}"


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, METHOD, datasets=("cifar10", "cifar100", "imagenet"))
    p.add_argument("--base", default="adadfq", choices=["adadfq", "gdfq"],
                   help="zero-shot base: AdaDFQ (released code, the paper's best numbers) or GDFQ")
    p.add_argument("--epochs", type=at_least(0), default=200, help="total epochs, warm-up included (AKT: 200)")
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
    p.add_argument("--milestones", type=float, nargs="*", default=[0.5],
                   help="lr x0.1 points, as fractions of the schedule (see --milestones-from); the reference keeps the "
                        "family's epochs 100/200/300 with 200 epochs, so it decays once, at epoch 100")
    p.add_argument("--milestones-from", default="all", choices=["all", "train"],
                   help="'all': fractions of --epochs (0.5 of 200: epoch 100); "
                        "'train': fractions of the post-warm-up epochs, offset by the warm-up (for short runs)")
    p.add_argument("--rfd-weight", type=float, default=1000.0, help="weight of the RFD term in the student loss")
    p.add_argument("--fd-temperature", type=float, default=8.0, help="softening temperature of the attention maps")
    p.add_argument("--temperature", type=float, default=20.0, help="logit temperature (GDFQ KL / AdaDFQ entropy)")
    p.add_argument("--entropy-weight", type=float, default=400.0, help="AdaDFQ student: weight of the entropy term")
    p.add_argument("--h-low", type=float, default=0.1,
                   help="AdaDFQ generator: lower bound of the normalised disagreement entropy (its lambda_l)")
    p.add_argument("--h-high", type=float, default=0.8,
                   help="AdaDFQ generator: upper bound of the normalised disagreement entropy (its lambda_u)")
    p.add_argument("--bns-weight", type=float, default=None,
                   help="weight of the BNS loss in the generator loss (default: 1.0 for adadfq, 0.1 for gdfq)")
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
    if args.dataset == "imagenet" and args.base != "adadfq":
        die("--base gdfq with --dataset imagenet: AKT's ImageNet recipe is AdaDFQ's; for GDFQ + RFD on ImageNet, "
            "copy this script and set its IMAGENET table from gdfq.py's")
    if args.bns_weight is None:
        args.bns_weight = 1.0 if args.base == "adadfq" else 0.1
    return args


def build_student(args, teacher):
    """The quantized student: a copy of the teacher, every conv/FC weight per-channel k-bit and every ReLU a
    calibrated k-bit activation quantizer (common.quantize_model); trained in eval mode (BN statistics frozen)."""
    return quantize_model(teacher, args.wbits, args.abits, args.act_ema).requires_grad_(True).eval()


# GDFQ generator and BNS loss, as in gdfq.py
class Generator(nn.Module):
    def __init__(self, num_classes, latent_dim=100, img_size=32):
        super().__init__()
        self.init_size = img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        # UpsampleConv3x3 = Upsample(x2, nearest) -> Conv3x3; BatchNorm2d(C, 0.8) is the reference's eps quirk
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



class BNStatsLoss:
    def __init__(self, teacher):
        self.stats, self.active = [], False
        for bn in [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]:
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


# ALGO LOGIC: the features RFD distils, read by forward hooks (the shared ResNet knows nothing of them)
class ResidualBranches:
    """Keeps every residual unit's branch output (its second BN's output, before the add) during `(model, x)`
    calls: returns (model(x), the 9 branch outputs in forward order). Hooks are inactive outside those calls."""

    def __init__(self, model):
        self.feats, self.active = [], False
        for m in residual_branches(model):  # common.py: the last BN of each residual block
            m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active:
            self.feats.append(full_precision(output))

    def __call__(self, model, x):
        self.active, self.feats = True, []
        try:
            logits = model(x)
        finally:
            self.active = False
        feats, self.feats = self.feats, []
        return logits, feats


# ALGO LOGIC: refined feature distillation (RFD)
class _SquareMeans(torch.autograd.Function):
    """(f².mean over H, W; f².mean over C) from one f², with the gradient in two passes over f, 2 f g_ch / HW +
    2 f g_sp / C (autograd's graphs of the two means take about seven); bit for bit autograd's where C and HW are
    powers of two (CIFAR), to float rounding otherwise."""

    @staticmethod
    def forward(ctx, f):
        ctx.save_for_backward(f)
        sq = f.pow(2)
        return sq.mean((2, 3)), sq.mean(1)

    @staticmethod
    def backward(ctx, g_ch, g_sp):
        f, = ctx.saved_tensors
        b, c, h, w = f.shape
        return torch.mul(f, (g_ch * (2 / (h * w)))[:, :, None, None]).add_(f * (g_sp * (2 / c))[:, None])


def attentions(f):
    """(channel attention: softmax over channels of the spatial mean of f^2, [B, C]; spatial attention: the
    L2-normalised (over positions) channel mean of f^2, [B, H*W])."""
    ch, sp = _SquareMeans.apply(f)
    return F.softmax(ch, dim=1), F.normalize(sp.flatten(1), dim=1)


def channel_attention(f):
    return attentions(f)[0]


def spatial_attention(f):
    return attentions(f)[1]


def kl_soft(a_s, a_t, temperature):
    return F.kl_div(F.log_softmax(a_s / temperature, 1), F.softmax(a_t / temperature, 1), reduction="sum")


def rfd_loss(feats_s, feats_t, temperature=8.0):
    """Sum over the residual-branch outputs of KL(channel attention) + KL(spatial attention); teacher detached."""
    loss = 0.0
    for fs, ft in zip(feats_s, feats_t):
        (ch_s, sp_s), (ch_t, sp_t) = attentions(fs), attentions(ft.detach())
        loss = loss + kl_soft(ch_s, ch_t, temperature) + kl_soft(sp_s, sp_t, temperature)
    return loss


# ALGO LOGIC: the bases' losses
def kd_loss(s_logits, t_logits, temperature):
    """GDFQ: KLDivLoss with PyTorch's 'mean' reduction (over B*C elements) x T^2."""
    T = temperature
    return F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="none").mean() * T * T


def soft_ce(logits, onehot):
    return -(onehot * F.log_softmax(logits, 1)).sum(1).mean()


def entropy(logits):
    """Per-sample entropy of softmax(logits), natural log."""
    logp = F.log_softmax(logits, 1)
    return -(logp.exp() * logp).sum(1)


def adadfq_generator_loss(t_logits, s_logits, y, num_classes, h_low=0.1, h_high=0.8):
    """AdaDFQ: one-hot terms on the teacher-student disagreement and agreement + an adaptive entropy band."""
    onehot = torch.zeros_like(t_logits).scatter_(1, y[:, None], 1.0)  # F.one_hot would check y on the host
    loss_onehot = 0.2 * soft_ce(t_logits - s_logits, onehot) + 0.1 * soft_ce(t_logits + s_logits, onehot)
    h = entropy(t_logits - s_logits)
    h_min = h.min()
    h_norm = (h - h_min) / (math.log(num_classes) - h_min)
    h_loss = F.relu(h_low - h_norm).mean() + F.relu(h_norm - h_high).mean()
    return h_loss + loss_onehot


def adadfq_student_loss(t_logits, s_logits, temperature, weight):
    """AdaDFQ: -weight * batch mean entropy of softmax((t - s) / T)."""
    return -weight * entropy((t_logits - s_logits) / temperature).mean()


if __name__ == "__main__":
    args = parse()
    teacher, info, test, run, teacher_top1 = setup(args, evaluate_only=args.epochs == 0)  # --epochs 0: teacher only
    device, num_classes = torch.device(args.device), NUM_CLASSES[args.dataset]

    student = build_student(args, teacher)
    generator = (GeneratorImageNet if args.dataset == "imagenet" else Generator)(
        num_classes, args.latent_dim).to(device).train()
    bns_loss = BNStatsLoss(teacher)
    t_branches, s_branches = ResidualBranches(teacher), ResidualBranches(student)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), lr=args.lr_s, momentum=args.momentum, nesterov=True,
                            weight_decay=args.weight_decay)
    milestones = lr_milestones(args.epochs, args.warmup_epochs, args.milestones, args.milestones_from)
    progress = Progress(args, run, test, teacher_top1,
                        {"student": student, "generator": generator, "opt_s": opt_s, "opt_g": opt_g})
    accelerate(args, teacher, student, generator)  # --amp bf16 / --compile, in place (common.py); off by default

    for epoch in range(progress.start_epoch, args.epochs):
        warmup = epoch < args.warmup_epochs
        set_calibrating(student, epoch < args.calib_epochs)
        factor = 0.1 ** sum(epoch >= m for m in milestones)
        set_lr(opt_g, args.lr_g * factor)
        set_lr(opt_s, args.lr_s * factor)
        for _ in progress.iterate(epoch, range(args.iters_per_epoch), args.iters_per_epoch):
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            y = torch.randint(0, num_classes, (args.batch_size,), device=device)

            # ALGO LOGIC: generator step; the teacher's residual-branch features are kept for RFD
            x = generator(z, y)
            bns_loss.active = True
            t_logits, t_feats = t_branches(teacher, x)
            bns_loss.active = False
            bns = bns_loss()
            if args.base == "adadfq":
                # G gets gradient through the quantized student; its parameters are frozen for this forward so
                # that none of this step's gradient reaches the student's own update
                student.requires_grad_(False)
                s_logits_g = student(x)
                student.requires_grad_(True)
                loss_g = adadfq_generator_loss(t_logits, s_logits_g, y, num_classes, args.h_low, args.h_high)
                loss_g = loss_g + args.bns_weight * bns
            else:
                loss_g = F.cross_entropy(t_logits, y) + args.bns_weight * bns
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            progress.add("losses/loss_G", loss_g)
            progress.add("losses/bns", bns)

            # ALGO LOGIC: student step: base loss + rfd_weight * RFD on the same (detached) images
            t_logits = t_logits.detach()
            with torch.set_grad_enabled(not warmup):
                s_logits, s_feats = s_branches(student, x.detach())
                if args.base == "adadfq":
                    base = adadfq_student_loss(t_logits, s_logits, args.temperature, args.entropy_weight)
                else:
                    base = kd_loss(s_logits, t_logits, args.temperature) + F.cross_entropy(s_logits, y)
                rfd = rfd_loss(s_feats, t_feats, args.fd_temperature)
                loss_s = base + args.rfd_weight * rfd
            if not warmup:
                opt_s.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
            progress.add("losses/base_S", base)
            progress.add("losses/rfd", rfd)
            progress.add("charts/teacher_acc_gen", (t_logits.argmax(1) == y).float().mean() * 100)  # on generated

        progress.end_epoch(epoch, student, {"lr_S": args.lr_s * factor, "lr_G": args.lr_g * factor},
                           args.iters_per_epoch * args.batch_size, warmup,
                           calibration_done=epoch == args.calib_epochs - 1)

    progress.finish(student, args.teacher_depth, num_classes, {  # what makes this run's cell comparable
        "quantizer": "zeroq: weights per output channel (min/max), activations per tensor (calibrated in the warm-up, "
                     "then fixed and clamped)", "activation_ranges": f"{args.act_ema} EMA",
        "train_data": "generated", "iterations": args.epochs * args.iters_per_epoch, "batch": args.batch_size,
        "teacher_passes_per_iteration": "1 forward, 1 backward (to the generator)"})
