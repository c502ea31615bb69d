"""FAQD: Feature Affinity assisted Knowledge Distillation and Quantization of deep neural networks on label-free
data (Li, Yang, Yin, Qi, Xin; IEEE Access 2023, arXiv 2302.10899).

Reference code: github.com/lzj994/FAQD (CIFAR/quant_distill_cifar10_full.py, quant_uni_type.py).
Idea: quantization-aware training on REAL training images without their labels: the quantized student matches the
FP teacher's logits (MSE) and, through a small learnable adapter, the teacher's feature affinity (the cosine
similarity between every pair of spatial positions) at the three stage outputs. FAQD brings its own quantizers
(weight projections and a learnable-step quantized ReLU). Docs: docs/faqd.md.

    python faqd.py --dataset cifar10 --wbits 4 --abits 4
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ArgumentParser, CifarResNet, Progress, accelerate, add_common_args, at_least, die,
                    load_cifar, method_name, parse_args, setup, swap_modules, train_batches)

WBITS, ABITS = (1, 2, 4), (1, 2, 4, 8)
METHOD = method_name(__file__)  # the name of the runs: a renamed copy of this file is a new method
# How run_all.sh and tools/report.py place this method (see gdfq.py)
GRID = {"kind": "label-free", "bits": [1, 2, 4], "supported_bits": [1, 2, 4], "year": 2023,
        "paper_for": "faqd",  # the published numbers below are faqd's: a renamed copy shows none of them
        "note": "published numbers not readable here"}


def variant(args):
    """The grid's label of a run (its args.json as a dict): flags that change the algorithm make a variant."""
    if args.get("float_acts"):
        return f"{METHOD}-floatacts"
    if args.get("alpha_mode", "learned") != "learned":
        return f"{METHOD}-{args['alpha_mode']}"
    return METHOD


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, METHOD)
    p.add_argument("--epochs", type=at_least(0), default=200,
                   help="passes over the training split (0: evaluate the teacher)")
    p.add_argument("--batch-size", type=at_least(1), default=100, help="real training images per iteration")
    p.add_argument("--train-subset", type=at_least(0), default=0, help="use only the first N training images (0: all)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD (Nesterov) learning rate, cosine decay over the epochs")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--grad-clip", type=float, default=20.0, help="gradient-norm clip of the student's parameters")
    p.add_argument("--kd", default="mse", choices=["mse", "kl"],
                   help="logit distillation: MSE, or KL at --kd-temperature (summed over the batch, as the reference)")
    p.add_argument("--kd-temperature", type=float, default=5.0, help="temperature for --kd kl")
    p.add_argument("--kd-coef", type=float, default=1.0, help="weight of the logit distillation term")
    p.add_argument("--fa-coef", type=float, default=0.1, help="weight of the feature-affinity term")
    p.add_argument("--label-coef", type=float, default=0.0, help="weight of the CE on true labels (0: label-free)")
    p.add_argument("--fa-type", default="fa", choices=["fa", "ffa"], help="exact feature affinity or its fast sketch")
    p.add_argument("--ffa-k", type=int, default=15, help="FFA: number of random projections")
    p.add_argument("--alpha-rate", type=float, default=0.01, help="activation-step gradient rate (reference: 0.01)")
    p.add_argument("--alpha-mode", default="learned", choices=["learned", "frozen"],
                   help="activation step: learned (the paper) or frozen at its initial value (what the reference's "
                        "training effectively does: its step never receives a gradient)")
    p.add_argument("--alpha-weight-decay", type=float, default=1e-6, help="weight decay of the activation steps")
    p.add_argument("--float-acts", action="store_true",
                   help="plain ReLU activations, only the weights projected (the reference's --fine_tuning mode)")
    p.add_argument("--memory-format", default="channels_last", choices=["channels_last", "contiguous"],
                   help="layout of the networks and batches: channels_last (faster) or contiguous (the reference's; "
                        "its float rounding, step for step)")
    p.add_argument("--student-depth", type=int, default=None, help="student ResNet depth (default: the teacher's)")
    p.add_argument("--from-scratch", action="store_true",
                   help="random student init (the paper's end-to-end mode) instead of the teacher's weights")
    args = parse_args(p, argv, bits=(1, 32))  # 32: float activations (--float-acts), as a resumed run saved them
    if args.wbits not in WBITS:
        die(f"--wbits {args.wbits} is not supported by FAQD's weight projections; choose from {WBITS}")
    if args.float_acts:
        args.abits = 32  # float activations: the run name and summary say so
    elif args.abits not in ABITS:
        die(f"--abits {args.abits} is not supported by FAQD's quantized ReLU; choose from {ABITS}")
    args.student_depth = args.student_depth or args.teacher_depth
    return args


# ALGO LOGIC: FAQD's weight projections (per layer), applied in the forward; the update goes to the float copy
def projection_codes(w, bits):
    """The projection as integer codes and one scale per layer: codes in {-1, +1} (1 bit; 0 only where w is exactly
    0), {-1, 0, 1} (2 bits) or -7..7 (4 bits)."""
    a = w.abs()
    if bits == 1:  # sign(w) * mean|w|
        return torch.sign(w), a.mean()
    if bits == 2:  # ternary: threshold 0.7 mean|w|, scale = mean of the kept magnitudes over all entries
        mask = (a >= 0.7 * a.mean()).float()
        return torch.sign(w) * mask, (a * mask).mean()
    # 4 bits: 15 symmetric levels; q in 0..7 at step 2*delta, least-squares scale sum|w|q / sum q^2
    delta = (a.max() / 15).clamp(max=10)
    q = torch.round(a / (2 * delta)).clamp(0, 7)
    return torch.sign(w) * q, (a * q).sum() / (q * q).sum().clamp(min=1e-12)


def project_weight(w, bits):
    codes, scale = projection_codes(w, bits)
    return codes * scale


class ProjConv2d(nn.Conv2d):
    """Conv2d whose forward uses the projected weight (gradient straight through to the float weight)."""
    wbits = 4

    def export_weight(self):  # the export contract of common.py
        codes, scale = projection_codes(self.weight.detach(), self.wbits)
        lim, step = {1: (1, 2), 2: (1, 1), 4: (7, 1)}[self.wbits]
        return {"codes": codes.long(), "scale": scale.double().reshape(1), "zero": torch.zeros(1, dtype=torch.long),
                "qmin": -lim, "qmax": lim, "code_step": step, "bits": self.wbits, "out_scale": 1.0,
                "quantizer": "faqd: symmetric projection, one scale per layer"}

    def forward(self, x):
        w = self.weight
        w_q = w + (project_weight(w.detach(), self.wbits) - w).detach()
        return self._conv_forward(x, w_q, self.bias)


class _QReLU(torch.autograd.Function):
    """Forward: a * ceil(x / a) on (0, a(L-1)], L a above, 0 for x <= 0 (and NaN), as the reference's two nested
    `where`s compute it, bit for bit, written without `where` (on a CPU a scalar loop, far slower than arithmetic;
    docs/speed.md): the code ceil(x / a) is raised to L above a(L-1), to 0 (+0) below 0, clamped to L, NaN to 0.
    Backward: the straight-through mask on (0, aL]; the step's gradient by the reference's 'mean' rule."""

    @staticmethod
    def forward(ctx, x, alpha, bits, rate):
        a, L = alpha.clamp(1e-3, 5), 2 ** bits - 1
        code = torch.div(x, a).ceil_()
        code = torch.maximum(code, torch.mul(x > a * (L - 1), float(L)), out=code).clamp_max_(L).nan_to_num_(0.0)
        ctx.save_for_backward(x, a)
        ctx.bits, ctx.rate = bits, rate
        return code.mul_(a)

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        L = 2 ** ctx.bits - 1
        top = x > a * L
        grad_x = g * ((x > 0) & ~top)  # passes on (0, aL]
        # reference 'mean' rule: d/d alpha = 2^(b-1) inside (0, aL], L above; x rate, clamped to +-1
        grad_a = (grad_x.sum() * 2.0 ** (ctx.bits - 1) + (g * top).sum() * L) * ctx.rate
        return grad_x, grad_a.clamp(-1, 1).reshape(1), None, None


class FAQDReLU(nn.Module):
    """FAQD's quantized ReLU: levels 0, a, 2a, ..., L*a (L = 2^b - 1) with a learnable step a."""
    INIT = {1: 1.2221, 2: 0.6511, 4: 0.1946, 8: 0.1946 / 17}  # reference inits; 8 bits: 4-bit step / 17 (ours)

    def __init__(self, bits, rate=0.01):
        super().__init__()
        self.bits, self.rate = bits, rate
        self.alpha = nn.Parameter(torch.tensor([self.INIT[bits]]))

    def forward(self, x):
        with torch.no_grad():
            self.alpha.clamp_(1e-3, 5)
        return _QReLU.apply(x, self.alpha, self.bits, self.rate)

    def export_act(self):  # levels k*a, k = ceil(x / a) clamped to 0..L (x <= 0 gives 0)
        a = self.alpha.detach().clamp(1e-3, 5).item()
        return {"relu": True, "offset": 0.0, "step": a, "zero": 0, "rounding": "ceil", "qmin": 0,
                "qmax": 2 ** self.bits - 1, "out_step": a, "out_zero": 0, "bits": self.bits,
                "quantizer": "faqd: learnable-step quantized ReLU (ceil)"}


# ALGO LOGIC: feature affinity (FA) and its fast sketch (FFA)
def _unit_positions(f):
    """[B, C, H, W] -> [B, C, HW] with every position's channel vector L2-normalised (eps 1e-5)."""
    f = f.flatten(2)
    return f / (f.norm(dim=1, keepdim=True) + 1e-5)


class _AffinityL1(torch.autograd.Function):
    """sum over the batch of ||S^T S - T^T T||_1 (S, T: [B, C, HW]; no gradient to T), a few images at a time, so
    that the B x HW x HW affinities (100 x 1024² at 32x32) never exist at once: each chunk's difference, |.| and sign
    stay in the cache instead of streaming 400 MB tensors through memory six times. D = [S; T]^T [S; -T], one
    product. Backward recomputes a chunk's D and returns 2 S sign(D) (D is symmetric: autograd's S (sign(D)^T +
    sign(D))). Equal to the plain expression up to float rounding (the order of the sums); computed in the inputs'
    dtype (float32 under --amp bf16 too)."""
    CHUNK = 1 << 21  # affinity entries per chunk (8 MB in float32)

    @staticmethod
    def chunks(s):
        n = max(1, _AffinityL1.CHUNK // s.shape[-1] ** 2)
        return [slice(i, i + n) for i in range(0, len(s), n)]

    @staticmethod
    def diff(s, t):
        return torch.bmm(torch.cat([s, t], 1).transpose(1, 2), torch.cat([s, -t], 1))

    @staticmethod
    def forward(ctx, s, t):
        ctx.save_for_backward(s, t)
        with torch.autocast(s.device.type, enabled=False):
            return torch.stack([_AffinityL1.diff(s[c], t[c]).abs_().sum() for c in _AffinityL1.chunks(s)]).sum()

    @staticmethod
    def backward(ctx, g):
        s, t = ctx.saved_tensors
        grad = torch.empty_like(s)
        with torch.autocast(s.device.type, enabled=False):
            for c in _AffinityL1.chunks(s):
                sign = _AffinityL1.diff(s[c], t[c]).sign_()
                torch.bmm(s[c], sign, out=grad[c])
        return grad.mul_(2 * g), None


def fa_loss(fs, ft):
    """sum over the batch of ||A_s - A_t||_1 / (HW)^2, A = F^T F over unit position vectors (teacher detached)."""
    ft = ft.detach()
    if ft.shape[-2:] != fs.shape[-2:]:
        ft = F.interpolate(ft, size=fs.shape[-2:], mode="bilinear", align_corners=True)  # as the reference
    s, t = _unit_positions(fs), _unit_positions(ft)
    return _AffinityL1.apply(s, t) / s.shape[-1] ** 2


def ffa_loss(fs, ft, k, generator):
    """FA's sketch: compare A_s V and A_t V (V: HW x k Gaussian, drawn from `generator`), computed as F^T (F V) in
    O(C HW k). |.| summed over positions, averaged over k, summed over the batch, / (HW)^2 (the reference's order 1)."""
    ft = ft.detach()
    if ft.shape[-2:] != fs.shape[-2:]:
        ft = F.interpolate(ft, size=fs.shape[-2:], mode="bilinear", align_corners=True)  # as the reference
    s, t = _unit_positions(fs), _unit_positions(ft)
    hw = s.shape[-1]
    v = torch.randn(hw, k, generator=generator, device=generator.device).to(fs.device, fs.dtype)
    m = s.transpose(1, 2) @ (s @ v) - t.transpose(1, 2) @ (t @ v)  # [B, HW, k]
    return m.abs().sum(1).mean(1).sum() / hw ** 2


def kd_loss(s_logits, t_logits, kind, temperature):
    """Logit distillation: MSE over all B*C entries (default), or KL(teacher || student) at T summed over the batch,
    x T^2 (the reference's KLDivLoss(size_average=False))."""
    if kind == "mse":
        return F.mse_loss(s_logits, t_logits)
    T = temperature
    return F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="sum") * T * T


class GeneratorState:
    """Checkpoint adapter for a torch.Generator (which has get_state/set_state, not state_dict)."""

    def __init__(self, gen):
        self.gen = gen

    def state_dict(self):
        return {"state": self.gen.get_state()}

    def load_state_dict(self, d):
        self.gen.set_state(d["state"])


def build_student(args, teacher):
    """The student ResNet (teacher weights unless --from-scratch) with FAQD's quantizers: every conv projected
    (first conv included), every ReLU a FAQDReLU (unless --float-acts), the FC full precision."""
    student = CifarResNet(args.student_depth, teacher.num_classes)
    if not args.from_scratch:
        if args.student_depth != args.teacher_depth:
            die("--student-depth differs from the teacher's: fine-tuning needs the same depth; add --from-scratch")
        student.load_state_dict(teacher.state_dict())

    def swap(m):
        if isinstance(m, nn.Conv2d):
            q = ProjConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
            q.load_state_dict(m.state_dict())
            q.wbits = args.wbits
            return q
        if isinstance(m, nn.ReLU) and not args.float_acts:
            return FAQDReLU(args.abits, args.alpha_rate)
        return None
    return swap_modules(student, swap).to(args.device, memory_format=memory_format(args))


def memory_format(args):
    return torch.contiguous_format if getattr(args, "memory_format", "") == "contiguous" else torch.channels_last


if __name__ == "__main__":
    args = parse()
    teacher, info, test, run, teacher_top1 = setup(args, evaluate_only=args.epochs == 0)  # --epochs 0: teacher only
    device, num_classes = torch.device(args.device), NUM_CLASSES[args.dataset]
    teacher = teacher.to(memory_format=memory_format(args))
    x_train, y_train = load_cifar(args.dataset, args.data_dir, train=True)
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    x_train, y_train = x_train.to(device), y_train.to(device)  # once: batches are cut and augmented there
    args.iters_per_epoch = len(x_train) // args.batch_size
    if args.iters_per_epoch == 0:
        die(f"--batch-size {args.batch_size} is larger than the {len(x_train)} training images")

    student = build_student(args, teacher)
    adapters = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU()) for c in (16, 32, 64)).to(device)
    alphas = [m.alpha for m in student.modules() if isinstance(m, FAQDReLU)]
    for a in alphas:
        a.requires_grad_(args.alpha_mode == "learned")
    others = [p for p in student.parameters() if all(p is not a for a in alphas)] + list(adapters.parameters())
    groups = [{"params": others}] + ([{"params": alphas, "weight_decay": args.alpha_weight_decay}] if alphas else [])
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True, weight_decay=args.weight_decay)
    ffa_gen = torch.Generator(device).manual_seed(args.seed)  # FFA's own RNG (not the global one), on the device
    progress = Progress(args, run, test, teacher_top1,
                        {"student": student, "adapters": adapters, "opt": opt, "ffa_gen": GeneratorState(ffa_gen)})
    accelerate(args, teacher, student, adapters)  # --amp bf16 / --compile, in place (common.py); off by default
    if progress.start_epoch == 0:
        progress.calib_top1 = test.top1(student)  # quantized, before any training step
        print(f"student top-1 before training {progress.calib_top1:.2f}", flush=True)

    for epoch in range(progress.start_epoch, args.epochs):
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))  # cosine over the epochs
        for group in opt.param_groups:
            group["lr"] = lr
        student.train()
        batches = train_batches(x_train, args.batch_size, test.mean, test.std, device, labels=y_train,
                                memory_format=memory_format(args))
        for x, y in progress.iterate(epoch, batches, args.iters_per_epoch):
            with torch.no_grad():
                t_logits, t_feats = teacher.forward_features(x)
            s_logits, s_feats = student.forward_features(x)
            # ALGO LOGIC: logit distillation + feature affinity of the three stage outputs (+ optional labels)
            kd = kd_loss(s_logits, t_logits, args.kd, args.kd_temperature)
            fa = sum(fa_loss(a(fs), ft) if args.fa_type == "fa" else ffa_loss(a(fs), ft, args.ffa_k, ffa_gen)
                     for a, fs, ft in zip(adapters, s_feats["stages"], t_feats["stages"]))
            ce = F.cross_entropy(s_logits, y) if args.label_coef else torch.zeros((), device=device)
            loss = args.kd_coef * kd + args.fa_coef * fa + args.label_coef * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)  # the reference clips the student only
            opt.step()
            progress.add("losses/loss", loss)
            progress.add("losses/kd", kd)
            progress.add("losses/fa", fa)
            progress.add("losses/ce", ce)
        student.eval()
        progress.end_epoch(epoch, student, {"lr": lr}, args.iters_per_epoch * args.batch_size)

    progress.finish(student, args.student_depth, num_classes, {  # what makes this run's cell comparable
        "quantizer": "faqd: projected weights (per layer), learnable-step quantized ReLU", "activation_ranges":
        "float" if args.float_acts else f"learned step ({args.alpha_mode})",
        "train_data": f"{args.dataset} train, first {args.train_subset or len(x_train)} images, labels unused",
        "iterations": args.epochs * args.iters_per_epoch, "batch": args.batch_size,
        "teacher_passes_per_iteration": "1 forward"})
