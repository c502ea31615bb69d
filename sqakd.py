"""SQAKD: Self-Supervised Quantization-Aware Knowledge Distillation (Zhao & Zhao, AISTATS 2024, arXiv 2403.11106).

Reference code: github.com/kaiqi123/SQAKD (CIFAR/train_quant.py, CIFAR/models/custom_modules.py).
Idea: quantization-aware training on REAL unlabeled images where the only loss is KL(teacher || student) at T = 4;
the student starts from the FP teacher. The paper frames any quantizer as clip -> normalise -> discretise ->
rescale, with a discretisation gradient scaled by delta (0 = straight-through; EWGS uses delta > 0), which is what
lets it wrap EWGS, PACT, LSQ and DoReFa. Docs: docs/sqakd.md.

    python sqakd.py --dataset cifar10 --wbits 2 --abits 2
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ArgumentParser, Progress, accelerate, add_common_args, at_least, die, load_cifar,
                    method_name, parse_args, setup, swap_modules, train_batches)

METHOD = method_name(__file__)  # the name of the runs: a renamed copy of this file is a new method
# How run_all.sh and tools/report.py place this method (see gdfq.py)
GRID = {"kind": "label-free", "bits": [1, 2, 3, 4], "supported_bits": [1, 2, 3, 4, 5, 6, 7, 8], "year": 2024,
        "paper_for": "sqakd",  # the published numbers below are sqakd's: a renamed copy shows none of them
        "note": "published numbers not readable here"}


def variant(args):
    """The grid's label of a run (its args.json as a dict): flags that change the algorithm make a variant."""
    name = METHOD if args.get("quantizer", "ewgs") == "ewgs" else f"{METHOD}-{args['quantizer']}"
    return name + ("-keeplast" if args.get("last_batch") == "keep" else "")

RECIPE = {  # the reference scripts' CIFAR settings
    "cifar10": dict(epochs=1200, batch_size=256, lr=1e-3, lr_q=1e-5, weight_decay=1e-4),
    "cifar100": dict(epochs=720, batch_size=64, lr=5e-4, lr_q=5e-6, weight_decay=5e-4),
}


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, METHOD)
    p.add_argument("--quantizer", default="ewgs", choices=["ewgs", "pact", "lsq", "dorefa"],
                   help="quantizer expressed in the unified clip/normalise/discretise/rescale form")
    p.add_argument("--delta", type=float, default=0.0, help="discretisation gradient scaling (0: STE; EWGS: > 0)")
    def per_dataset(k):  # the defaults of these five depend on the dataset (RECIPE, the reference's scripts)
        return f"default: {RECIPE['cifar10'][k]} on CIFAR-10, {RECIPE['cifar100'][k]} on CIFAR-100"
    p.add_argument("--epochs", type=at_least(0), default=None,
                   help=f"passes over the training split ({per_dataset('epochs')})")
    p.add_argument("--batch-size", type=at_least(1), default=None,
                   help=f"images per iteration ({per_dataset('batch_size')})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam lr of the model parameters ({per_dataset('lr')})")
    p.add_argument("--lr-q", type=float, default=None,
                   help=f"Adam lr of the quantizer parameters ({per_dataset('lr_q')})")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"model-parameter weight decay ({per_dataset('weight_decay')})")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    p.add_argument("--train-subset", type=at_least(0), default=0, help="use only the first N training images (0: all)")
    p.add_argument("--no-augment", action="store_true", help="no random crop + flip")
    p.add_argument("--last-batch", default="drop", choices=["drop", "keep"],
                   help="the epoch's last, smaller batch: dropped, or trained on as the reference's DataLoader does")
    args = parse_args(p, argv, bits=(1, 8))
    for k, v in RECIPE[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.delta < 0:
        die(f"--delta {args.delta} must be >= 0")
    return args


# ALGO LOGIC: the unified quantizer's discretiser: round on a 2^b - 1 grid in [0, 1], scaled gradient
class _Discretise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn, bits, delta):
        n = 2 ** bits - 1
        xq = torch.round(xn * n) / n
        ctx.save_for_backward(xn - xq)
        ctx.delta = delta
        return xq

    @staticmethod
    def backward(ctx, g):
        (err,) = ctx.saved_tensors  # dL/dxn = dL/dxq * (1 + delta * sign(dL/dxq) * (xn - xq))
        return g * (1 + ctx.delta * torch.sign(g) * err) if ctx.delta else g, None, None


def discretise(xn, bits, delta=0.0):
    return _Discretise.apply(xn, bits, delta)


class _Unified(torch.autograd.Function):
    """discretise(clamp((x - lo) / (hi - lo), 0, 1)) as one function, for per-tensor (0-dim) lo and hi: the same
    values as that chain, bit for bit; the gradients of x, lo and hi in a few passes over x instead of the ten or so
    of autograd's graph of the chain, without its slow `where` (x's gradient bit for bit but at a NaN input, lo's
    and hi's to float rounding). With t = (x - lo) / r, r = hi - lo and g the gradient reaching t, zero where the clamp
    clipped: dx = g / r, dlo = sum(g (t - 1)) / r, dhi = -sum(g t) / r. The clamp passes gradient where 0 < t < 1,
    as clamp(t, 0, 1)'s own gradient does in torch 2.14 (some releases also pass it at t = 0 and 1 exactly)."""

    @staticmethod
    def forward(ctx, x, lo, hi, bits, delta):
        n, r = 2 ** bits - 1, hi - lo
        t = (x - lo).div_(r)
        xn = t.clamp(0, 1)
        xq = torch.round(xn * n).div_(n)
        ctx.save_for_backward(xn, r, xn - xq if delta else None)
        ctx.delta = delta
        return xq

    @staticmethod
    def backward(ctx, g):
        xn, r, err = ctx.saved_tensors
        if ctx.delta:  # the discretiser's scaled gradient, as _Discretise
            g = g * (1 + ctx.delta * torch.sign(g) * err)
        # the clamp passes gradient where 0 < xn < 1: two vectorised masks (`where` and bool products are slow here)
        g = torch.ops.aten.threshold_backward(torch.ops.aten.threshold_backward(g, xn, 0.0), xn.neg(), -1.0)
        need_x, need_lo, need_hi = ctx.needs_input_grad[:3]
        gt = _dot(g, xn) if need_lo or need_hi else None  # sum(g t): t = xn where g is not zero
        grad_lo = (gt - g.sum()) / r if need_lo else None
        grad_hi = -gt / r if need_hi else None
        return g.div_(r) if need_x else None, grad_lo, grad_hi, None, None


def _dot(a, b):
    """sum(a * b) for two tensors of one shape: one pass (a dot product over memory) when they share a dense layout."""
    if a.stride() == b.stride() and a.dtype == b.dtype == torch.float32 and (
            a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))):
        return torch.dot(a.as_strided((a.numel(),), (1,)), b.as_strided((b.numel(),), (1,)))
    return (a * b).sum()


def unified(x, lo, hi, bits, delta):
    """clip to [lo, hi] -> normalise to [0, 1] -> discretise; returns the normalised discrete value in [0, 1]."""
    return _Unified.apply(x, lo, hi, bits, delta)


class UQConv2d(nn.Conv2d):
    """Conv2d with quantized weights and quantized input activations, per-tensor learned ranges.

    ewgs  : w_q = 2 (D((W - lW)/(uW - lW)) - 0.5), a_q = D((x - lA)/(uA - lA)), y = conv(a_q, w_q) * |scale|
    pact  : DoReFa weights, a_q = D(clip(x, 0, uA)/uA) * uA (learned clip uA)
    lsq   : w_q = D((W - lW)/(uW - lW)) (uW - lW) + lW with lW = -2^(b-1) sW, uW = (2^(b-1) - 1) sW; a_q likewise on
            [0, (2^b - 1) sA]; learned steps sW, sA (autograd through the pipeline gives LSQ's step gradient,
            without its 1/sqrt(N Qp) gradient scale)
    dorefa: w_q = 2 D(tanh(W)/(2 max|tanh W|) + 0.5) - 1, a_q = D(clip(x, 0, 1)); nothing learned
    """
    method, wbits, abits, delta, initialising = "ewgs", 4, 4, 0.0, False

    def setup_quant(self, method, wbits, abits, delta):
        self.method, self.wbits, self.abits, self.delta = method, wbits, abits, delta
        for name in ("lW", "uW", "lA", "uA", "scale", "sW", "sA"):
            self.register_parameter(name, nn.Parameter(torch.ones(())))
        return self

    def quant_params(self):
        return [self.lW, self.uW, self.lA, self.uA, self.scale, self.sW, self.sA]

    @torch.no_grad()
    def init_ranges(self, x):
        """The reference's initialisation from one batch (and its analogues for the other quantizers)."""
        w, qp_w, qp_a = self.weight, 2 ** (self.wbits - 1) - 1 or 1, 2 ** self.abits - 1
        self.uW.fill_(3 * w.std())
        self.lW.fill_(-3 * w.std())
        self.uA.fill_(3 * x.std() / math.sqrt(1 - 2 / math.pi))
        self.lA.fill_(x.min())
        self.sW.fill_(2 * w.abs().mean() / math.sqrt(qp_w))
        self.sA.fill_(2 * x.abs().mean() / math.sqrt(qp_a))
        self.scale.fill_(1.0)
        ref = self._conv_forward(x, w, self.bias).abs().mean()
        self.scale.fill_(ref / self.quant_forward(x).abs().mean().clamp(min=1e-12))

    def quant_forward(self, x):
        b_w, b_a, d, m = self.wbits, self.abits, self.delta, self.method
        if m == "ewgs":
            w_q = 2 * (unified(self.weight, self.lW, self.uW, b_w, d) - 0.5)
            a_q = unified(x, self.lA, self.uA, b_a, d)
            return self._conv_forward(a_q, w_q, self.bias) * self.scale.abs()
        if m in ("pact", "dorefa"):
            t = torch.tanh(self.weight)
            w_q = 2 * discretise(t / (2 * t.abs().max()) + 0.5, b_w, d) - 1
            hi = self.uA if m == "pact" else torch.ones((), device=x.device)
            a_q = unified(x, torch.zeros((), device=x.device), hi, b_a, d) * hi
            return self._conv_forward(a_q, w_q, self.bias)
        lo_w, hi_w = -(2 ** (b_w - 1)) * self.sW, (2 ** (b_w - 1) - 1 or 1) * self.sW  # lsq
        w_q = unified(self.weight, lo_w, hi_w, b_w, d) * (hi_w - lo_w) + lo_w
        hi_a = (2 ** b_a - 1) * self.sA
        a_q = unified(x, torch.zeros((), device=x.device), hi_a, b_a, d) * hi_a
        return self._conv_forward(a_q, w_q, self.bias)

    def forward(self, x):
        if self.initialising:
            self.init_ranges(x)
        return self.quant_forward(x)

    # The export contract of common.py. Every quantizer here rounds m = round(xn * n) on n = 2^b - 1 steps of [0, 1]
    @torch.no_grad()
    def export_weight(self):
        b, n, w = self.wbits, 2 ** self.wbits - 1, self.weight.detach()
        if self.method == "lsq":  # w_hat = lo + m (hi - lo) / n = sW (m - 2^(b-1)); for 1 bit sW (2m - 1)
            lo, hi = -(2 ** (b - 1)) * self.sW, (2 ** (b - 1) - 1 or 1) * self.sW
            m = torch.round(((w - lo) / (hi - lo)).clamp(0, 1) * n)
            codes, scale, qmin, step = (2 * m - 1, self.sW, -1, 2) if b == 1 else (m - 2 ** (b - 1), self.sW,
                                                                                    -(2 ** (b - 1)), 1)
            qmax = qmin + step * n
        else:  # ewgs, pact, dorefa: w_hat = 2 m / n - 1 = (2m - n) / n
            if self.method == "ewgs":
                xn = ((w - self.lW) / (self.uW - self.lW)).clamp(0, 1)
            else:
                t = torch.tanh(w)
                xn = t / (2 * t.abs().max()) + 0.5
            codes, scale, qmin, qmax, step = 2 * torch.round(xn * n) - n, torch.tensor(1.0 / n), -n, n, 2
        return {"codes": codes.long(), "scale": scale.double().reshape(1), "zero": torch.zeros(1, dtype=torch.long),
                "qmin": qmin, "qmax": qmax, "code_step": step, "bits": b,
                "out_scale": self.scale.abs().item() if self.method == "ewgs" else 1.0,
                "quantizer": f"sqakd {self.method}: per-tensor weights (output x |scale| for ewgs)"}

    @torch.no_grad()
    def export_input(self):
        n = 2 ** self.abits - 1
        if self.method == "ewgs":  # a_hat = m / n, m = round((x - lA) / (uA - lA) * n): in [0, 1], not in x's units
            lo, hi, out = self.lA.item(), self.uA.item(), 1.0 / n
        else:
            hi = {"pact": self.uA.item(), "dorefa": 1.0, "lsq": n * self.sA.item()}[self.method]
            lo, out = 0.0, hi / n
        return {"relu": False, "offset": lo, "step": (hi - lo) / n, "zero": 0, "rounding": "nearest", "qmin": 0,
                "qmax": n, "out_step": out, "out_zero": 0, "bits": self.abits,
                "quantizer": f"sqakd {self.method}: per-tensor input activations"}


def build_student(args, teacher):
    """A copy of the teacher whose convs, except the first, are UQConv2d; the classifier stays FP."""
    import copy
    student = copy.deepcopy(teacher).requires_grad_(True)

    def swap(m):
        if isinstance(m, nn.Conv2d) and m is not student.conv1:
            q = UQConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
            q.load_state_dict(m.state_dict())
            return q.setup_quant(args.quantizer, args.wbits, args.abits, args.delta)
        return None
    return swap_modules(student, swap).to(args.device, memory_format=torch.channels_last)


@torch.no_grad()
def initialise(student, x):
    """Set every quantizer's ranges from one training batch, layer by layer, in forward order."""
    qconvs = [m for m in student.modules() if isinstance(m, UQConv2d)]
    for m in qconvs:
        m.initialising = True
    student(x)
    for m in qconvs:
        m.initialising = False


# ALGO LOGIC: the only loss: KL(teacher || student) at T, batch mean, no labels
def kd_loss(s_logits, t_logits, temperature):
    T = temperature
    return F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean") * T * T


if __name__ == "__main__":
    args = parse()
    teacher, info, test, run, teacher_top1 = setup(args, evaluate_only=args.epochs == 0)  # --epochs 0: teacher only
    device, num_classes = torch.device(args.device), NUM_CLASSES[args.dataset]
    x_train, _ = load_cifar(args.dataset, args.data_dir, train=True)
    if args.train_subset:
        x_train = x_train[:args.train_subset]
    x_train = x_train.to(device)  # once: batches are cut and augmented there
    args.iters_per_epoch = (len(x_train) // args.batch_size if args.last_batch == "drop"
                            else math.ceil(len(x_train) / args.batch_size))
    if args.iters_per_epoch == 0:
        die(f"--batch-size {args.batch_size} is larger than the {len(x_train)} training images")

    student = build_student(args, teacher)
    qparams = [p for m in student.modules() if isinstance(m, UQConv2d) for p in m.quant_params()]
    mparams = [p for p in student.parameters() if all(p is not q for q in qparams)]
    opt = torch.optim.Adam(mparams, lr=args.lr, weight_decay=args.weight_decay)
    opt_q = torch.optim.Adam(qparams, lr=args.lr_q, weight_decay=0.0)
    progress = Progress(args, run, test, teacher_top1, {"student": student, "opt": opt, "opt_q": opt_q})
    accelerate(args, teacher, student)  # --amp bf16 / --compile, in place (common.py); off by default
    if progress.start_epoch == 0:
        # initialise the ranges on one training batch before the first step (without it the loss is NaN)
        initialise(student.train(), next(train_batches(x_train, args.batch_size, test.mean, test.std, device)))
        progress.calib_top1 = test.top1(student)
        print(f"student top-1 after range initialisation {progress.calib_top1:.2f}", flush=True)

    for epoch in range(progress.start_epoch, args.epochs):
        cos = 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))  # cosine decay to 0 over the epochs
        for o, lr in ((opt, args.lr), (opt_q, args.lr_q)):
            for group in o.param_groups:
                group["lr"] = lr * cos
        student.train()
        batches = train_batches(x_train, args.batch_size, test.mean, test.std, device, not args.no_augment,
                                drop_last=args.last_batch == "drop")
        for x in progress.iterate(epoch, batches, args.iters_per_epoch):
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd_loss(student(x), t_logits, args.temperature)
            opt.zero_grad(set_to_none=True)
            opt_q.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            opt_q.step()
            progress.add("losses/kd", loss)
        student.eval()
        progress.end_epoch(epoch, student, {"lr": args.lr * cos, "lr_q": args.lr_q * cos},
                           len(x_train) if args.last_batch == "keep" else args.iters_per_epoch * args.batch_size)

    progress.finish(student, args.teacher_depth, num_classes, {  # what makes this run's cell comparable
        "quantizer": f"sqakd-{args.quantizer}: weights and activations per layer, learned ranges; first conv and FC "
                     "full precision", "activation_ranges": "learned (initialised on one batch)",
        "train_data": f"{args.dataset} train, first {args.train_subset or len(x_train)} images, labels unused",
        "iterations": args.epochs * args.iters_per_epoch, "batch": args.batch_size,
        "teacher_passes_per_iteration": "1 forward"})
