"""LRQ: Long-Range Zero-Shot Generative Deep Network Quantization (Luo et al., Neural Networks 166, 2023,
arXiv 2211.06816) -- OUR READING OF THE ABSTRACT.

No official training code is public and only the abstract is available, so every component below is our reading
of one sentence of it, and each is a switch: a long-range generator (large-kernel attention after the generator's
upsampling stages, `--no-lka`), an adversarial margin on the teacher's target-class angle in the generator's CE
(`--ama-margin`), and decoupled knowledge distillation for the student (`--kd dkd|kl`). Everything else is the
GDFQ loop. No number produced by this script is LRQ's own result. Docs: docs/lrq.md.

    python lrq.py --dataset cifar10 --wbits 4
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ArgumentParser, Progress, UpsampleConv3x3, accelerate, add_common_args, at_least,
                    batch_stats, check_warmup, classifier, full_precision, logits_and_pooled, lr_milestones,
                    method_name, parse_args, quantize_model, set_calibrating, set_lr, setup)

METHOD = method_name(__file__)  # the name of the runs: a renamed copy of this file is a new method
# How run_all.sh and tools/report.py place this method (see gdfq.py)
GRID = {"kind": "zero-shot", "bits": [3, 4, 5], "supported_bits": [2, 3, 4, 5, 6, 7, 8], "year": 2023,
        "paper_for": "lrq",  # the published numbers below are lrq's: a renamed copy shows none of them
        "note": "our reading of the abstract; no LRQ number exists"}

# The ImageNet recipe (our reading: LRQ publishes no code, so GDFQ's imagenet_resnet18.hocon), the defaults of the
# flags not given with --dataset imagenet; every other flag keeps its CIFAR default
IMAGENET = {"batch_size": 16, "warmup_epochs": 50, "calib_epochs": 4, "lr_s": 1e-6}


def variant(args):
    """The grid's label of a run (its args.json as a dict): flags that change the algorithm make a variant."""
    margin = args.get("ama_margin", 0)
    on = (["lka"] if not args.get("no_lka") else []) + ([f"ama{margin:g}"] if margin > 0 else []) \
        + (["dkd"] if args.get("kd", "dkd") == "dkd" else [])
    dkd = "" if args.get("kd", "dkd") != "dkd" else (
        (f"-b{args['dkd_beta']:g}" if args.get("dkd_beta", 8.0) != 8.0 else "")
        + ("-ce" if args.get("dkd_ce_weight", 0.0) else ""))
    return (METHOD if len(on) == 3 else f"{METHOD}:" + ("+".join(on) or "none")) + dkd  # the components that are on


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
                   help="'all': fractions of --epochs; 'train': fractions of the post-warm-up epochs (short runs)")
    p.add_argument("--bns-weight", type=float, default=0.1, help="weight of the BNS loss in the generator loss")
    p.add_argument("--latent-dim", type=int, default=100, help="generator noise dimension")
    p.add_argument("--no-lka", action="store_true", help="GDFQ's generator without the large-kernel attention blocks")
    p.add_argument("--ama-margin", type=float, default=0.3,  # from a sweep 0/0.1/0.3 (docs/lrq.md)
                   help="additive angular margin (radians) on the teacher's target logit in the generator CE; 0: off")
    p.add_argument("--kd", default="dkd", choices=["dkd", "kl"],
                   help="student loss: decoupled KD, or GDFQ's KL('mean', --temperature) + CE")
    p.add_argument("--dkd-alpha", type=float, default=1.0, help="DKD: weight of the target-class term (TCKD)")
    p.add_argument("--dkd-beta", type=float, default=8.0, help="DKD: weight of the non-target-class term (NCKD)")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="DKD temperature")
    p.add_argument("--dkd-ce-weight", type=float, default=0.0,
                   help="DKD: weight of a CE on the generator's labels beside DKD "
                        "(mdistiller's distiller: 1, not ramped)")
    p.add_argument("--dkd-warmup", type=at_least(0), default=20,
                   help="DKD's linear ramp: the DKD loss is x min(e / N, 1) in the e-th student epoch (DKD's CIFAR "
                        "value 20); 0: no ramp")
    p.add_argument("--temperature", type=float, default=20.0, help="KL temperature for --kd kl (GDFQ)")
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


class DilatedDepthwiseConv(nn.Conv2d):
    """Depthwise k x k conv, dilation d, 'same' padding, computed on CPU as a plain k x k conv over the d*d
    interleaved sub-grids folded into the batch (output row d*p + r only reads input rows = r mod d). Same sums;
    PyTorch's CPU dilated depthwise kernel is ~5x slower than the plain one. On CUDA: the usual dilated conv."""

    def __init__(self, c, k, d):
        super().__init__(c, c, k, padding=d * (k // 2), dilation=d, groups=c)

    def forward(self, x):
        if x.is_cuda:
            return super().forward(x)
        d, (b, c, h, w) = self.dilation[0], x.shape
        hp, wp = -(-h // d), -(-w // d)  # sub-grid size; zero rows/columns added at the end act as padding
        x = F.pad(x, (0, wp * d - w, 0, hp * d - h)).reshape(b, c, hp, d, wp, d)
        x = x.permute(0, 3, 5, 1, 2, 4).reshape(b * d * d, c, hp, wp)
        y = F.conv2d(x, self.weight, self.bias, padding=self.kernel_size[0] // 2, groups=c)
        y = y.reshape(b, d, d, c, hp, wp).permute(0, 3, 4, 1, 5, 2).reshape(b, c, hp * d, wp * d)
        return y[:, :, :h, :w]


# ALGO LOGIC (our reading): large-kernel attention (VAN's spatial attention with shortcut)
class LKA(nn.Module):
    """Depthwise 5x5 -> depthwise 7x7 dilation 3 -> 1x1: a 21x21 receptive field at depthwise cost."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.dw_dilated = DilatedDepthwiseConv(c, 7, 3)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.pw(self.dw_dilated(self.dw(x)))


class LKABlock(nn.Module):
    """x + Conv1x1(LKA(a) * a), a = GELU(Conv1x1(x)): the attention map gates the features."""

    def __init__(self, c):
        super().__init__()
        self.proj_in, self.lka, self.proj_out = nn.Conv2d(c, c, 1), LKA(c), nn.Conv2d(c, c, 1)

    def forward(self, x):
        a = F.gelu(self.proj_in(x))
        return x + self.proj_out(self.lka(a) * a)


class Generator(nn.Module):
    """GDFQ's generator with an LKA block after each upsampling conv stage."""

    def __init__(self, num_classes, latent_dim=100, img_size=32, lka=True):
        super().__init__()
        self.init_size = img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        # UpsampleConv3x3 = Upsample(x2, nearest) -> Conv3x3; BatchNorm2d(C, 0.8) is the reference's eps quirk
        self.block1 = nn.Sequential(UpsampleConv3x3(128, 128), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2),
                                    LKABlock(128) if lka else nn.Identity())  # 128 ch at 16x16
        self.block2 = nn.Sequential(UpsampleConv3x3(128, 64), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
                                    LKABlock(64) if lka else nn.Identity(),  # 64 ch at 32x32
                                    nn.Conv2d(64, 3, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(3, affine=False))

    def forward(self, z, y):
        h = self.l1(self.label_emb(y) * z).view(-1, 128, self.init_size, self.init_size)
        return self.block2(self.block1(self.bn0(h)))


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


# ALGO LOGIC (our reading): adversarial margin add on the class-centre angle
def margin_logits(logits, feat, fc, y, margin):
    """The teacher's logits = fc(feat) with the target logit replaced by ||W_y|| ||f|| cos(theta_y + m) + b_y."""
    if margin == 0:
        return logits
    w_y = fc.weight[y]  # [B, D]: the class centres
    norms = w_y.norm(dim=1) * feat.norm(dim=1)
    cos = ((w_y * feat).sum(1) / norms.clamp(min=1e-12)).clamp(-1 + 1e-7, 1 - 1e-7)
    target = norms * torch.cos(torch.acos(cos) + margin) + fc.bias[y]
    return logits.scatter(1, y[:, None], target[:, None])


# ALGO LOGIC: decoupled knowledge distillation (Zhao et al., CVPR 2022)
def dkd_loss(s_logits, t_logits, y, alpha=1.0, beta=8.0, temperature=4.0):
    """alpha * TCKD + beta * NCKD, both KL x T^2 averaged over the batch."""
    T = temperature
    gt = torch.zeros_like(s_logits, dtype=torch.bool).scatter_(1, y[:, None], True)  # F.one_hot checks y on the host
    p_s, p_t = F.softmax(s_logits / T, 1), F.softmax(t_logits / T, 1)
    tgt = y[:, None]  # gather, not boolean-mask indexing: no host synchronisation on a GPU
    b_s = torch.cat([p_s.gather(1, tgt), p_s.masked_fill(gt, 0).sum(1, keepdim=True)], 1)  # [p(target), p(other)]
    b_t = torch.cat([p_t.gather(1, tgt), p_t.masked_fill(gt, 0).sum(1, keepdim=True)], 1)
    # kl_div treats 0 * log 0 as 0: a very confident teacher (non-target mass underflowing to 0) stays finite
    tckd = F.kl_div(b_s.clamp(min=1e-12).log(), b_t, reduction="sum") / len(y) * T * T
    log_q_s = F.log_softmax(s_logits / T - 1000.0 * gt, 1)
    q_t = F.softmax(t_logits / T - 1000.0 * gt, 1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") / len(y) * T * T
    return alpha * tckd + beta * nckd


def kd_loss(s_logits, t_logits, temperature):
    """GDFQ: KLDivLoss with PyTorch's 'mean' reduction (over B*C elements) x T^2."""
    T = temperature
    return F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="none").mean() * T * T


if __name__ == "__main__":
    args = parse()
    teacher, info, test, run, teacher_top1 = setup(args, evaluate_only=args.epochs == 0)  # --epochs 0: teacher only
    device, num_classes = torch.device(args.device), NUM_CLASSES[args.dataset]

    student = build_student(args, teacher)
    generator = Generator(num_classes, args.latent_dim, 224 if args.dataset == "imagenet" else 32,  # ImageNet: 224x224
                          lka=not args.no_lka).to(device).train()
    bns_loss, t_fc = BNStatsLoss(teacher), classifier(teacher)  # t_fc: the teacher's classifier, for the margin
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
        # DKD's reference ramps its loss in over the first --dkd-warmup student epochs (without it: NaN, see
        # docs/lrq.md); 0 during the warm-up, when the student takes no step
        ramp = min(max(epoch + 1 - args.warmup_epochs, 0) / args.dkd_warmup, 1.0) if args.dkd_warmup else 1.0
        ramp = ramp if args.kd == "dkd" else 1.0
        for _ in progress.iterate(epoch, range(args.iters_per_epoch), args.iters_per_epoch):
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            y = torch.randint(0, num_classes, (args.batch_size,), device=device)

            # ALGO LOGIC: generator step: CE on margin logits (AMA) + 0.1 * BNS
            x = generator(z, y)
            bns_loss.active = True
            t_logits, t_pool = logits_and_pooled(teacher, x)
            bns_loss.active = False
            ce_g = F.cross_entropy(margin_logits(t_logits, t_pool, t_fc, y, args.ama_margin), y)
            bns = bns_loss()
            loss_g = ce_g + args.bns_weight * bns
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            progress.add("losses/loss_G", loss_g)
            progress.add("losses/ce_G", ce_g)
            progress.add("losses/bns", bns)

            # ALGO LOGIC: student step: DKD with the generator's labels (or GDFQ's KL + CE)
            t_logits = t_logits.detach()
            with torch.set_grad_enabled(not warmup):
                s_logits = student(x.detach())
                ce = F.cross_entropy(s_logits, y)
                if args.kd == "dkd":  # the ramp multiplies the DKD term only, as in mdistiller
                    loss_s = dkd_loss(s_logits, t_logits, y, args.dkd_alpha, args.dkd_beta, args.kd_temperature)
                    loss_step = ramp * loss_s + args.dkd_ce_weight * ce if args.dkd_ce_weight else ramp * loss_s
                else:
                    loss_s = loss_step = kd_loss(s_logits, t_logits, args.temperature) + ce
            if not warmup:
                opt_s.zero_grad(set_to_none=True)
                loss_step.backward()  # loss_S is logged without the ramp (and without the DKD's CE)
                opt_s.step()
            progress.add("losses/loss_S", loss_s)
            progress.add("charts/teacher_acc_gen", (t_logits.argmax(1) == y).float().mean() * 100)  # on generated

        charts = {"lr_S": args.lr_s * factor, "lr_G": args.lr_g * factor, "dkd_ramp": ramp}
        progress.end_epoch(epoch, student, charts, args.iters_per_epoch * args.batch_size, warmup,
                           calibration_done=epoch == args.calib_epochs - 1)

    progress.finish(student, args.teacher_depth, num_classes, {  # what makes this run's cell comparable
        "quantizer": "zeroq: weights per output channel (min/max), activations per tensor (calibrated in the warm-up, "
                     "then fixed and clamped)", "activation_ranges": f"{args.act_ema} EMA",
        "train_data": "generated", "iterations": args.epochs * args.iters_per_epoch, "batch": args.batch_size,
        "teacher_passes_per_iteration": "1 forward, 1 backward (to the generator)"})
