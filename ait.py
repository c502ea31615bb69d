"""AIT: It's All In the Teacher: Zero-Shot Quantization Brought Closer to the Teacher (Choi et al., CVPR 2022,
arXiv 2203.17008).

Reference code: github.com/iamkanghyunchoi/ait, folder GDFQ_AIT/ (trainer.py, optimizer.py = gradient inundation).
Idea: on the GDFQ loop, distil with the KL term only (no CE on the generator's labels), and update the quantized
weights with "gradient inundation": scale each tensor's step until at least a threshold fraction of its integer
codes actually changes, so that tiny low-lr updates are not all absorbed by the rounding. Docs: docs/ait.md.

    python ait.py --dataset cifar10 --wbits 4
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ArgumentParser, Progress, QConv2d, QLinear, UpsampleConv3x3, accelerate,
                    add_common_args, at_least, batch_stats, check_warmup, full_precision, lr_milestones, method_name,
                    parse_args, quantize_model, scale_zero, set_calibrating, set_lr, setup, weight_codes)

METHOD = method_name(__file__)  # the name of the runs: a renamed copy of this file is a new method
# How run_all.sh and tools/report.py place this method (see gdfq.py)
GRID = {"kind": "zero-shot", "bits": [3, 4, 5], "supported_bits": [2, 3, 4, 5, 6, 7, 8], "year": 2022,
        "paper_for": "ait",  # the published numbers below are ait's: a renamed copy shows none of them
        "paper": {"cifar10 W4A4": [91.23, "AIT paper (GDFQ+AIT)"], "cifar10 W5A5": [93.41, "AIT paper (GDFQ+AIT)"],
                  "cifar100 W4A4": [65.80, "AIT paper (GDFQ+AIT)"], "cifar100 W5A5": [69.26, "AIT paper (GDFQ+AIT)"]}}

# The ImageNet recipe (reference: GDFQ_AIT/imagenet_{resnet18,resnet50,mobilenet_v2}.hocon and run_imgnet_*.sh,
# the same for the three networks), the defaults of the flags not given with --dataset imagenet
IMAGENET = {"batch_size": 16, "warmup_epochs": 50, "calib_epochs": 4, "passing_threshold": 1e-4}


def variant(args):
    """The grid's label of a run (its args.json as a dict): flags that change the algorithm make a variant."""
    if args.get("no_gi"):
        return f"{METHOD}-nogi"
    if args.get("gi_result", "midpoint") != "midpoint":
        return f"{METHOD}-{args['gi_result']}"
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
    p.add_argument("--lr-s", type=float, default=1e-4, help="student learning rate (SGD / GI, Nesterov)")
    p.add_argument("--lr-g", type=float, default=1e-3, help="generator learning rate (Adam, betas 0.5/0.999)")
    p.add_argument("--momentum", type=float, default=0.9, help="student momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="student weight decay (AIT: 0)")
    p.add_argument("--milestones", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                   help="lr (and GI threshold) x0.1 points, as fractions of the schedule (see --milestones-from)")
    p.add_argument("--milestones-from", default="all", choices=["all", "train"],
                   help="'all': fractions of --epochs (paper: 100/200/300 of 400); "
                        "'train': fractions of the post-warm-up epochs, offset by the warm-up (for short runs)")
    p.add_argument("--temperature", type=float, default=20.0, help="KD temperature")
    p.add_argument("--kl-reduction", default="mean", choices=["mean", "batchmean"],
                   help="KLDivLoss reduction: 'mean' (reference: averages over B*C) or 'batchmean' (true KL)")
    p.add_argument("--bns-weight", type=float, default=0.1, help="weight of the BNS loss in the generator loss")
    p.add_argument("--latent-dim", type=int, default=100, help="generator noise dimension")
    p.add_argument("--passing-threshold", type=float, default=1e-3,
                   help="GI: minimum fraction of a tensor's integer codes that must change per step "
                        "(x0.1 at milestones)")
    p.add_argument("--alpha-cap", type=float, default=1e9,
                   help="GI: doubling stops once alpha passes this (after the first student epoch the reference has no "
                        "bound; this one binds only on a vanishing gradient, and each hit is counted in the log)")
    p.add_argument("--gi-first-cap", type=float, default=100.0,
                   help="GI, first student epoch only: doubling stops once alpha passes this "
                        "(reference: 100, i.e. 128)")
    p.add_argument("--gi-result", default="midpoint", choices=["midpoint", "upper"],
                   help="GI: keep the last bisection midpoint (reference; may miss the threshold) or the upper end")
    p.add_argument("--gi-search", default="auto", choices=["auto", "sequential", "batched"],
                   help="GI's alpha search (same result): one candidate at a time, or all candidates batched without a "
                        "host synchronisation; auto: batched on CUDA")
    p.add_argument("--no-gi", action="store_true", help="plain Nesterov SGD for every parameter (ablation)")
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


# ALGO LOGIC: student loss = KL only (no CE on the generator's labels)
def kd_loss(s_logits, t_logits, temperature, reduction="mean"):
    T = temperature
    kl = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="none")
    return (kl.mean() if reduction == "mean" else kl.sum() / len(kl)) * T * T  # 'mean': over B*C elements


# ALGO LOGIC: gradient inundation (GI) for the quantized weights (reference: optimizer.py, SGD_adalr)
class GradientInundation(torch.optim.Optimizer):
    """Nesterov SGD whose step on each weight tensor is scaled by alpha, chosen per step as the reference does:
    perc(a) = fraction of the tensor's integer codes (per-channel min/max, `wbits`) that change under p - a*lr*d.
    alpha = 1 if perc(1) >= threshold; else double alpha until perc(alpha) >= threshold or alpha > cap, then bisect
    5 times between alpha/2 and alpha (stopping early when |perc - threshold| < threshold/100) and keep the last
    midpoint tried (`result="midpoint"`, the reference, which may miss the threshold) or the upper end, which always
    reaches it (`"upper"`). cap = `first_cap` while `first_epoch` is set (the reference's first student epoch:
    doubling stops at 128), else `alpha_cap` (the reference has no bound there). The search uses the raw gradient;
    weight decay enters the update and the momentum buffer, as in the reference."""

    def __init__(self, params, lr, wbits, threshold, momentum=0.9, weight_decay=0.0, alpha_cap=1e9, first_cap=100.0,
                 result="midpoint", batched=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, threshold=threshold, weight_decay=weight_decay))
        self.wbits, self.alpha_cap, self.first_cap, self.result = wbits, alpha_cap, first_cap, result
        self.batched = batched  # None: batched on CUDA (no host sync), sequential elsewhere (fewer evaluations)
        self.first_epoch, self.last_alphas, self.cap_hits = False, [], 0

    def find_alpha(self, p, d, lr, threshold):
        """The multiplier for the step -lr*alpha*d on p (float32 comparisons on the device, as the reference)."""
        codes = weight_codes(p, self.wbits)

        def perc(a):
            return (weight_codes(p - (a * lr) * d, self.wbits) != codes).float().mean()

        alpha = 1.0
        if perc(alpha) >= threshold:
            return alpha
        cap = self.first_cap if self.first_epoch else self.alpha_cap
        while True:  # double until enough codes change, or alpha passes the cap
            alpha *= 2
            if perc(alpha) >= threshold:
                break
            if alpha > cap:
                self.cap_hits += 1
                break
        lo, hi = alpha / 2, alpha
        for _ in range(5):  # bisect for the smallest multiplier that still crosses the threshold
            mid = (lo + hi) / 2
            pm = perc(mid)
            if torch.abs(pm - threshold) < threshold / 100:
                return mid
            lo, hi = (mid, hi) if pm < threshold else (lo, mid)
        return mid if self.result == "midpoint" else hi

    def find_alpha_batched(self, p, d, lr, threshold):
        """find_alpha's result as a float64 0-dim tensor, without a host synchronisation: every multiplier the search
        can try is evaluated in two batched passes (the doubling ladder 1, 2, ..., 2^J up to the cap; then the 31
        points that 5 bisection steps can visit in the final interval), and the search's path is replayed with
        tensor operations. More arithmetic than find_alpha, no waiting: for GPUs."""
        k, shape = self.wbits, (-1,) + (1,) * p.dim()

        def percs(alphas):  # [n] float64 multipliers -> [n] float32 changed fractions, as perc() for each
            steps = (alphas * lr).float().view(shape)  # the scalar a*lr rounded once to float32, as a Python float
            flat = (p.unsqueeze(0) - steps * d.unsqueeze(0)).flatten(2)
            s, z = scale_zero(flat.amin(2, keepdim=True), flat.amax(2, keepdim=True), k)
            codes = (flat * s - z).round().clamp(-(2 ** (k - 1)), 2 ** (k - 1) - 1)
            return (codes != weight_codes(p, k)).float().mean((1, 2))

        cap = self.first_cap if self.first_epoch else self.alpha_cap
        n = int(math.floor(math.log2(cap))) + 1  # doubling passes the cap at 2^n
        ladder = 2.0 ** torch.arange(n + 1, device=p.device, dtype=torch.float64)
        ok = percs(ladder) >= threshold
        crossed = ok[1:].any()
        j = torch.where(crossed, ok[1:].int().argmax() + 1, n)  # first doubling that crossed, or the cap's
        self.cap_hits = self.cap_hits + (~ok[0] & ~crossed).int()
        lo = 2.0 ** (j - 1).double()  # bisection on [lo, 2 lo]: its midpoints are lo (1 + i/32), i = 1..31
        mids = percs(lo * (1 + torch.arange(1, 32, device=p.device, dtype=torch.float64) / 32))
        a, b = torch.zeros((), dtype=torch.long, device=p.device), torch.full((), 32, device=p.device)
        done = torch.zeros((), dtype=torch.bool, device=p.device)
        last = a
        for _ in range(5):
            mid = (a + b) // 2
            pm = mids.index_select(0, (mid - 1).view(1)).squeeze(0)  # not mids[mid - 1]: that reads mid on the host
            last = torch.where(done, last, mid)
            done = done | (torch.abs(pm - threshold) < threshold / 100)
            a, b = torch.where(done | (pm >= threshold), a, mid), torch.where(done | (pm < threshold), b, mid)
        pick = last if self.result == "midpoint" else torch.where(done, last, b)
        return torch.where(ok[0], torch.ones_like(lo), lo * (1 + pick.double() / 32))

    @torch.no_grad()
    def step(self):
        self.last_alphas = []
        for group in self.param_groups:
            lr, mom, th, wd = group["lr"], group["momentum"], group["threshold"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                buf = state.get("buf")
                search = g + mom * (g if buf is None else mom * buf + g)
                batched = p.is_cuda if self.batched is None else self.batched
                alpha = (self.find_alpha_batched if batched else self.find_alpha)(p, search, lr, th)
                d_p = g if wd == 0 else g.add(p, alpha=wd)
                if buf is None:
                    buf = state["buf"] = d_p.clone()
                else:
                    buf.mul_(mom).add_(d_p)
                if batched:  # alpha is a device tensor
                    p.sub_(d_p.add(buf, alpha=mom) * (lr * alpha).to(p.dtype))
                else:
                    p.add_(d_p.add(buf, alpha=mom), alpha=-lr * alpha)  # Nesterov
                self.last_alphas.append(alpha)


if __name__ == "__main__":
    args = parse()
    teacher, info, test, run, teacher_top1 = setup(args, evaluate_only=args.epochs == 0)  # --epochs 0: teacher only
    device, num_classes = torch.device(args.device), NUM_CLASSES[args.dataset]

    student = build_student(args, teacher)
    generator = (GeneratorImageNet if args.dataset == "imagenet" else Generator)(
        num_classes, args.latent_dim).to(device).train()
    bns_loss = BNStatsLoss(teacher)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    # ALGO LOGIC: GI on the quantized weights (every conv and the FC weight); BN and the FC bias: plain SGD
    qweights = [m.weight for m in student.modules() if isinstance(m, (QConv2d, QLinear))]
    others = [p for p in student.parameters() if all(p is not q for q in qweights)]
    if args.no_gi:
        others, qweights = others + qweights, []
    opt_s = torch.optim.SGD(others, lr=args.lr_s, momentum=args.momentum, nesterov=True,
                            weight_decay=args.weight_decay)
    opts = {"opt_s": opt_s, "opt_g": opt_g}
    if qweights:
        opts["opt_gi"] = GradientInundation(qweights, args.lr_s, args.wbits, args.passing_threshold, args.momentum,
                                            args.weight_decay, args.alpha_cap, args.gi_first_cap, args.gi_result,
                                            {"auto": None, "sequential": False, "batched": True}[args.gi_search])
    milestones = lr_milestones(args.epochs, args.warmup_epochs, args.milestones, args.milestones_from)
    opt_gi = opts.get("opt_gi")
    progress = Progress(args, run, test, teacher_top1, {"student": student, "generator": generator, **opts})
    accelerate(args, teacher, student, generator)  # --amp bf16 / --compile, in place (common.py); off by default

    for epoch in range(progress.start_epoch, args.epochs):
        warmup = epoch < args.warmup_epochs
        set_calibrating(student, epoch < args.calib_epochs)  # ranges follow the generated data in the warm-up only
        factor = 0.1 ** sum(epoch >= m for m in milestones)
        set_lr(opt_g, args.lr_g * factor)
        set_lr(opt_s, args.lr_s * factor)
        if opt_gi:
            set_lr(opt_gi, args.lr_s * factor)
            set_lr(opt_gi, args.passing_threshold * factor, key="threshold")
            opt_gi.first_epoch, opt_gi.cap_hits = epoch == args.warmup_epochs, 0  # reference: capped in epoch 1 only
        for _ in progress.iterate(epoch, range(args.iters_per_epoch), args.iters_per_epoch):
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            y = torch.randint(0, num_classes, (args.batch_size,), device=device)

            # generator step, as GDFQ: CE(teacher(x), y) + 0.1 * BNS
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
            progress.add("losses/loss_G", loss_g)
            progress.add("losses/ce_G", ce_g)
            progress.add("losses/bns", bns)

            # ALGO LOGIC: student step: KL only; GI for the quantized weights
            with torch.set_grad_enabled(not warmup):
                s_logits = student(x.detach())
                loss_s = kd_loss(s_logits, t_logits.detach(), args.temperature, args.kl_reduction)
            progress.add("losses/loss_S", loss_s)
            if not warmup:
                student.zero_grad(set_to_none=True)
                loss_s.backward()
                opt_s.step()
                if opt_gi:
                    t_gi = time.time()
                    opt_gi.step()
                    if device.type == "cpu":  # on a GPU the step is asynchronous: host time would not measure it
                        progress.add("charts/gi_s_per_iter", time.time() - t_gi)
                    progress.add("charts/gi_mean_alpha", sum(opt_gi.last_alphas) / len(opt_gi.last_alphas))
            progress.add("charts/teacher_acc_gen", (t_logits.argmax(1) == y).float().mean() * 100)  # on generated

        if opt_gi and not warmup:
            progress.note("charts/gi_cap_hits", int(opt_gi.cap_hits))  # tensor-steps whose doubling a cap stopped
        progress.end_epoch(epoch, student, {"lr_S": args.lr_s * factor, "lr_G": args.lr_g * factor},
                           args.iters_per_epoch * args.batch_size, warmup,
                           calibration_done=epoch == args.calib_epochs - 1)

    progress.finish(student, args.teacher_depth, num_classes, {  # what makes this run's cell comparable
        "quantizer": "zeroq: weights per output channel (min/max), activations per tensor (calibrated in the warm-up, "
                     "then fixed and clamped)", "activation_ranges": f"{args.act_ema} EMA",
        "train_data": "generated", "iterations": args.epochs * args.iters_per_epoch, "batch": args.batch_size,
        "teacher_passes_per_iteration": "1 forward, 1 backward (to the generator)"})
