"""SynQ: Accurate Zero-shot Quantization by Synthesis-aware Fine-tuning (Kim, Kim, Kang, ICLR 2025, arXiv 2603.18423).

Reference code: github.com/snudm-starlab/SynQ (src/data_generate/distill_data.py: the synthetic images;
src/main_direct.py, src/trainer_direct.py, src/gradcam.py: the fine-tuning).
Idea: first synthesise a fixed set of images by optimising Gaussian noise against the FP teacher (BatchNorm-statistics
matching plus a HAST-style hard-sample-weighted CE); then fine-tune the quantized student on them through a
low-pass filter (synthetic noise is high-frequency), with KD, CE on the samples the teacher finds easy only (soft
labels alone for difficult ones), a Grad-CAM alignment with the teacher, and the same losses on a sign-gradient
perturbed copy of each batch. The activation ranges are calibrated first on a GDFQ generator's images, as in the
reference. Docs: docs/synq.md.

    python synq.py --dataset cifar10 --wbits 3
"""

import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (NUM_CLASSES, ArgumentParser, Progress, UpsampleConv3x3, UserError, accelerate, add_common_args,
                    at_least, batch_stats, check_warmup, describe_interrupt, fmt_time, full_precision,
                    load_weights_only, lr_milestones, method_name, parse_args, quantize_model, residual_branches,
                    rng_state, set_calibrating, set_lr, set_rng_state, setup)

METHOD = method_name(__file__)  # the name of the runs: a renamed copy of this file is a new method
GRID = {"kind": "zero-shot", "bits": [3, 4, 5], "supported_bits": [2, 3, 4, 5, 6, 7, 8], "year": 2025,
        "paper_for": "synq",  # the published numbers below are synq's: a renamed copy shows none of them
        "paper": {"cifar10 W3A3": [88.11, "SynQ paper"], "cifar10 W4A4": [92.76, "SynQ paper"],
                  "cifar100 W3A3": [57.28, "SynQ paper"], "cifar100 W4A4": [67.34, "SynQ paper"]},
        # the synthesis stage's budget, per run_all.sh budget (the other flags come from the zero-shot budget)
        "budget_args": {"short": "--num-images 512 --syn-batch 256 --syn-iters 200",
                        "smoke": "--num-images 16 --syn-batch 8 --syn-iters 2"}}

# The ImageNet recipe (the paper's section 5.1: fine-tuning batch 16, 100 epochs; the reference's distill_data.py and
# trainer_direct.py: crops in the synthesis, FA on the perturbed batch; its imagenet_3bit.hocon has batch 4 and 101
# epochs, docs/synq.md), the defaults of the flags not given with --dataset imagenet; every other flag keeps its CIFAR
# default, which is the reference's too
IMAGENET = {"batch_size": 16, "syn_aug": 0.5, "fa_pert": 1}


def variant(args):
    """The grid's label of a run (its args.json as a dict): flags that change the algorithm make a variant."""
    off = [k for k in ("lambda_ce", "lambda_cam", "lambda_pert", "lambda_fa") if args.get(k, 1) == 0]
    return METHOD + "".join(f"-no{k[7:]}" for k in off) + ("-nolpf" if args.get("d_zero", 1) == 0 else "")


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, METHOD, datasets=("cifar10", "cifar100", "imagenet"))
    # stage 1: the synthetic images (ZeroQ/HAST style, the release's CIFAR-100 script)
    p.add_argument("--num-images", type=at_least(1), default=5120, help="synthetic images (paper: 5,120)")
    p.add_argument("--syn-batch", type=at_least(1), default=256, help="images optimised together (paper: 256)")
    p.add_argument("--syn-iters", type=at_least(1), default=1000, help="Adam steps per synthesis batch (reference)")
    p.add_argument("--syn-lr", type=float, default=0.5, help="Adam lr on the pixels (reduced on plateau)")
    p.add_argument("--syn-beta", type=float, default=0.1, help="weight of the hard-sample CE in the synthesis loss")
    p.add_argument("--syn-gamma", type=float, default=0.5, help="hard-sample focus: CE weighted by (1 - p)^gamma")
    p.add_argument("--syn-aug", type=float, default=0.0,
                   help="probability, per synthesis step, that the teacher sees the batch randomly resized-cropped "
                        "(scale 0.4-1) and flipped instead of as it is (the reference's ImageNet synthesis)")
    p.add_argument("--synthetic", default=None, metavar="PATH",
                   help="the synthetic set's file: used if finished, continued if cut short, made there if absent "
                        "(one set can serve several runs, as the paper's; default: RUN_DIR/synthetic.pt)")
    # stage 2: calibration (warm-up, GDFQ generator) and fine-tuning
    p.add_argument("--epochs", type=at_least(0), default=100, help="total epochs, warm-up included (paper: 100)")
    p.add_argument("--warmup-epochs", type=int, default=4,
                   help="epochs in which a GDFQ generator trains and only the activation ranges calibrate")
    p.add_argument("--iters-per-epoch", type=at_least(1), default=200, help="iterations per epoch (reference)")
    p.add_argument("--batch-size", type=at_least(1), default=256, help="fine-tuning batch (paper: 256 on CIFAR)")
    p.add_argument("--calib-batch", type=at_least(1), default=16, help="generator batch in the warm-up (reference)")
    p.add_argument("--lr-s", type=float, default=1e-6, help="student learning rate (SGD, Nesterov; the release's)")
    p.add_argument("--lr-g", type=float, default=1e-3, help="warm-up generator learning rate (Adam, 0.5/0.999)")
    p.add_argument("--momentum", type=float, default=0.9, help="student SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="student weight decay")
    p.add_argument("--milestones", type=float, nargs="*", default=[],
                   help="lr x0.1 points, as fractions of the schedule (reference: none within its epochs)")
    p.add_argument("--milestones-from", default="all", choices=["all", "train"],
                   help="'all': fractions of --epochs; 'train': of the post-warm-up epochs, offset by the warm-up")
    p.add_argument("--temperature", type=float, default=20.0, help="KD temperature")
    p.add_argument("--kd-alpha", type=float, default=20.0, help="KD weight (times T^2, on the batch-mean KL)")
    p.add_argument("--lambda-ce", type=float, default=0.5, help="CE on easy samples (0: off)")
    p.add_argument("--tau", type=float, default=0.5,
                   help="difficulty threshold: CE only where 1 - p_teacher(label) < tau (difficult: soft labels only)")
    p.add_argument("--lambda-cam", type=float, default=50.0, help="Grad-CAM alignment (0: off)")
    p.add_argument("--lambda-fa", type=float, default=4000.0, help="channel-attention alignment of every residual "
                                                                   "branch (0: off)")
    p.add_argument("--lambda-pert", type=float, default=1.0,
                   help="losses on the sign-gradient perturbed batch (0: off)")
    p.add_argument("--fa-pert", type=int, default=0, choices=[0, 1],
                   help="1: the FA term on the perturbed batch too (the reference does so on ImageNet only)")
    p.add_argument("--eps", type=float, default=0.01, help="perturbation step (on the normalised images)")
    p.add_argument("--d-zero", type=float, default=80.0, help="low-pass filter cut-off D0 in frequency bins (0: no "
                                                              "filter)")
    p.add_argument("--latent-dim", type=int, default=100, help="warm-up generator noise dimension")
    p.add_argument("--act-ema", default="plain", choices=["plain", "reference"],
                   help="activation-range calibration: a plain EMA of the batch min/max, or the reference code's "
                        "bias-corrected one, which inflates the ranges for the first ~150 updates")
    args = parse_args(p, argv, dataset_defaults={"imagenet": IMAGENET})
    check_warmup(args.epochs, args.warmup_epochs)
    return args


def build_student(args, teacher):
    """The quantized student: a copy of the teacher, every conv/FC weight per-channel k-bit and every ReLU a
    calibrated k-bit activation quantizer (common.quantize_model); trained in eval mode (BN statistics frozen)."""
    return quantize_model(teacher, args.wbits, args.abits, args.act_ema).requires_grad_(True).eval()


# ALGO LOGIC: BN-statistics hooks (biased batch variance of every BN's input), shared by both stages
class BNStats:
    def __init__(self, model):
        self.stats, self.active = [], False
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active:
            # float32 statistics under --amp bf16; the biased variance around the running mean (common.py)
            self.stats.append((module, *batch_stats(full_precision(inputs[0]), module.running_mean)))

    def __call__(self):
        """(mean over BN layers of MSE(batch mean, running mean), the same for the variances); clears the stats."""
        m = sum(F.mse_loss(mu, bn.running_mean) for bn, mu, _ in self.stats) / len(self.stats)
        v = sum(F.mse_loss(var, bn.running_var) for bn, _, var in self.stats) / len(self.stats)
        self.stats = []
        return m, v


# ALGO LOGIC: stage 1, the synthetic images (one batch: Gaussian pixels optimised against the teacher)
def synthesize_batch(teacher, bn_stats, n, iters, lr, beta, gamma, num_classes, device, batches_left=None,
                     size=32, aug=0.0):
    """One batch of n size x size images; with `batches_left`, a first ETA after a few steps (a batch can take
    minutes). `aug`: the probability per step that the teacher sees them randomly resized-cropped and flipped."""
    x = torch.randn(n, 3, size, size, device=device).requires_grad_(True)
    y = torch.randint(0, num_classes, (n,), device=device)
    opt = torch.optim.Adam([x], lr=lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=50)
    for step in range(iters):
        if step == 1:
            t1 = time.time()
        elif step == 4 and batches_left is not None:
            per = (time.time() - t1) / 3
            print(f"synthesis: {per:.3g} s/step over steps 2-4: about {fmt_time(per * iters)} a batch, ETA of the "
                  f"synthesis {fmt_time(per * iters * batches_left)}", flush=True)
        x_in = x
        if aug and torch.rand(()).item() < aug:  # ImageNet: crops (scale 0.4-1) and flips, through which x learns
            x_in = random_resized_crop(x, scale=(0.4, 1.0))
            x_in = torch.where((torch.rand(n, device=device) < 0.5)[:, None, None, None], x_in.flip(3), x_in)
        bn_stats.active = True
        logits = teacher(x_in)
        bn_stats.active = False
        mean_l, var_l = bn_stats()
        p = F.softmax(logits, 1).gather(1, y[:, None])[:, 0]
        # HAST hard samples: CE weighted by (1 - p)^gamma; 1 - p clamped at 1e-12, or a saturated softmax (p == 1.0 in
        # float32) gives the power an infinite gradient and the images NaN (the value is unchanged for p < 1)
        ce = beta * ((1 - p).clamp(min=1e-12).pow(gamma) * F.cross_entropy(logits, y, reduction="none")).mean()
        loss = mean_l + var_l + ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        plateau.step(loss.item())  # the plateau rule needs the value on the host: once per step, as the reference
    with torch.no_grad():
        acc = (teacher(x).argmax(1) == y).float().mean().item() * 100
    return x.detach(), y, loss.item(), acc


SYNTHESIS_FLAGS = ("dataset", "teacher_depth", "num_images", "syn_batch", "syn_iters", "syn_lr", "syn_beta",
                   "syn_gamma")  # a set made with other values is refused; another --seed may reuse it (recorded)


def synthesize(args, teacher, path, device, num_classes, teacher_sha256=None):
    """The synthetic set, made batch by batch into `path` (a killed run's file is continued from its last finished
    batch, with the random state saved there; a finished set is loaded, never regenerated). A file made with other
    synthesis settings or another teacher is refused; one made with another --seed is used as it is, and this run's
    random state stays its own."""
    bn_stats, nb = BNStats(teacher), math.ceil(args.num_images / args.syn_batch)
    made_with = {**{k: getattr(args, k) for k in SYNTHESIS_FLAGS}, "teacher_sha256": teacher_sha256}
    if args.dataset == "imagenet":
        made_with.update(arch=args.arch, syn_aug=args.syn_aug)
    size = 224 if args.dataset == "imagenet" else 32
    cache = {"images": [], "labels": [], "made_with": made_with, "seed": args.seed}
    if os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--synthetic {path}: give a file in an existing folder")
    if os.path.exists(path):
        cache = load_weights_only(path, "synthetic set")
        if not isinstance(cache, dict) or "images" not in cache or "made_with" not in cache:
            raise UserError(f"--synthetic {path} is not a synthetic set written by this script")
        differ = [k for k in made_with if cache.get("made_with", {}).get(k) != made_with[k]]
        if differ:
            raise UserError(f"--synthetic {path} was made with other settings ({', '.join(differ)}); use another file "
                            f"or the settings it was made with")
        if cache.get("seed") == args.seed:  # continue, or start training, exactly as the run that made it
            set_rng_state(cache["rng"])
    if len(cache["images"]) < nb:
        print(f"synthesis: {args.num_images} images in {nb} batches of {args.syn_iters} Adam steps into {path}",
              flush=True)
    describe_interrupt(lambda: f"during the synthesis; its finished batches are in {path}: run the same command with "
                               f"--synthetic {path} to go on from there" if os.path.exists(path) else
                       "during the synthesis's first batch: nothing to keep; start again")
    for b in range(len(cache["images"]), nb):
        n = min(args.syn_batch, args.num_images - b * args.syn_batch)
        t0 = time.time()
        x, y, loss, acc = synthesize_batch(teacher, bn_stats, n, args.syn_iters, args.syn_lr, args.syn_beta,
                                           args.syn_gamma, num_classes, device,
                                           nb - b if b == len(cache["images"]) else None, size, args.syn_aug)
        cache["images"].append(x.cpu())  # float32, as the reference pickles it (5,120 images: 63 MB)
        cache["labels"].append(y.cpu())
        cache["rng"] = rng_state()
        torch.save(cache, path + ".tmp")
        os.replace(path + ".tmp", path)
        dt = time.time() - t0
        print(f"synthesis batch {b + 1}/{nb} | loss {loss:.4g} | teacher top-1 on it {acc:.1f} | {dt:.0f} s | "
              f"ETA {fmt_time(dt * (nb - b - 1))}", flush=True)
    return torch.cat(cache["images"]).to(device), torch.cat(cache["labels"]).to(device)


# ALGO LOGIC: the GDFQ conditional generator, trained in the warm-up so that its images calibrate the ranges
class Generator(nn.Module):
    def __init__(self, num_classes, latent_dim=100, img_size=32):
        super().__init__()
        self.init_size = img_size // 4
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        # BatchNorm2d(C, 0.8): the reference passes 0.8 as eps (positional); UpsampleConv3x3 = Upsample(x2) -> Conv3x3
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



# ALGO LOGIC: fine-tuning data: random resized crop (scale 0.5-1, ratio 3/4-4/3) + flip, then the low-pass filter
def random_resized_crop(x, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision's RandomResizedCrop (size = input size) for a batch: per image, the first of `attempts` draws of
    area and log-ratio that fits, else the central crop; bilinear resize done as one grid_sample."""
    b, _, h, w = x.shape
    dev = x.device
    area = h * w * torch.empty(b, attempts, device=dev).uniform_(*scale)
    r = torch.exp(torch.empty(b, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros_like(ok[:, 0], dtype=torch.long))
    cw, ch = cw.gather(1, first[:, None])[:, 0], ch.gather(1, first[:, None])[:, 0]
    cw, ch = torch.where(ok.any(1), cw, torch.full_like(cw, w)), torch.where(ok.any(1), ch, torch.full_like(ch, h))
    i = torch.floor(torch.rand(b, device=dev) * (h - ch + 1))
    j = torch.floor(torch.rand(b, device=dev) * (w - cw + 1))
    # output pixel u of the crop [j, j+cw) samples x at j + (u + 0.5) * cw / w - 0.5 (align_corners=False)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = cw / w, ch / h
    theta[:, 0, 2], theta[:, 1, 2] = (2 * j + cw) / w - 1, (2 * i + ch) / h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def low_pass(x, d_zero):
    """Gaussian low-pass filter in the centred 2-D spectrum: H = exp(-D^2 / (2 D0^2)), D the distance (in frequency
    bins) from the centre (H//2, W//2). The reference's apply_filters."""
    if d_zero <= 0:
        return x
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    filt = torch.exp(-((xx - w // 2) ** 2 + (yy - h // 2) ** 2) / (2 * d_zero ** 2))
    spec = torch.fft.fftshift(torch.fft.fft2(x, dim=(-2, -1)), dim=(-2, -1)) * filt
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), dim=(-2, -1)).real


# ALGO LOGIC: what the losses read from a forward: residual-branch outputs (FA) and the last conv's output (CAM)
class Taps:
    def __init__(self, model):
        self.branches, self.last, self.active = [], None, False
        for m in residual_branches(model):  # common.py: the last BN of each residual block
            m.register_forward_hook(self._branch)
        [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1].register_forward_hook(self._last)

    def _branch(self, module, inputs, output):
        if self.active:
            self.branches.append(full_precision(output))

    def _last(self, module, inputs, output):
        if self.active:  # as it is: Grad-CAM differentiates by this very tensor (bf16 under --amp bf16)
            self.last = output

    def __call__(self, model, x):
        """(logits, the residual branches' outputs, the last conv's output)."""
        self.active, self.branches = True, []
        try:
            logits = model(x)
        finally:
            self.active = False
        return logits, self.branches, self.last


def kd_loss(s_logits, t_logits, temperature, alpha):
    """alpha * T^2 * KL(teacher || student) at temperature T, averaged over the batch (the reference adds 1e-7 to
    the student's log-probabilities, which shifts the value by -1e-7 and leaves the gradient unchanged)."""
    T = temperature
    return F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean") * alpha * T * T


def easy_ce(s_logits, y, easy):
    """CE over the batch with the difficult samples' rows replaced by zero logits and label 0, as the reference: they
    add log(C) to the value and nothing to the gradient (so the mean is over the whole batch)."""
    return F.cross_entropy(torch.where(easy[:, None], s_logits, torch.zeros_like(s_logits)),
                           torch.where(easy, y, torch.zeros_like(y)))


class _MeanSquare(torch.autograd.Function):
    """f.pow(2).mean((2, 3)) with its gradient in one pass over f, 2 f g / HW (autograd's graph takes three: the
    mean's expanded gradient, 2 f, their product); bit for bit the same where HW is a power of two (CIFAR)."""

    @staticmethod
    def forward(ctx, f):
        ctx.save_for_backward(f)
        return f.pow(2).mean((2, 3))

    @staticmethod
    def backward(ctx, g):
        f, = ctx.saved_tensors
        return f * (g * (2 / (f.shape[2] * f.shape[3])))[:, :, None, None]


def channel_attention(f):
    return F.normalize(_MeanSquare.apply(f), dim=1)


def fa_loss(s_branches, t_branches):
    """sum over residual branches of the MSE between the L2-normalised channel attentions."""
    return sum((channel_attention(s) - channel_attention(t)).pow(2).mean() for s, t in zip(s_branches, t_branches))


def grad_cam(logits, act, size, create_graph=False):
    """Grad-CAM of the top class at the layer whose output is `act`: channel weights = the spatial mean of d(top
    logit)/d(act), clamped at 1e-10 (the reference's, not Grad-CAM's signed weights), taken as constants; ReLU of the
    weighted sum, bilinear to `size`, min-max normalised per image (+1e-10)."""
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    g = full_precision(torch.autograd.grad(score, act, retain_graph=True, create_graph=create_graph)[0])
    cam = F.relu((g.mean((2, 3), keepdim=True).clamp(min=1e-10) * full_precision(act)).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False).flatten(1)
    lo, hi = cam.min(1, keepdim=True)[0], cam.max(1, keepdim=True)[0]
    return ((cam - lo) / (hi - lo + 1e-10)).view(-1, 1, *size)


def finetune_losses(args, student, teacher, s_taps, t_taps, x, y):
    """The fine-tuning loss of one batch and its parts (the reference's trainer step after the warm-up)."""
    x = x.requires_grad_(True)
    t_logits, t_branches, t_last = t_taps(teacher, x)
    easy = (1 - F.softmax(t_logits, 1).gather(1, y[:, None])[:, 0]) < args.tau  # soft labels only for difficult
    s_logits, s_branches, s_last = s_taps(student, x)
    kd = kd_loss(s_logits, t_logits, args.temperature, args.kd_alpha)
    ce = easy_ce(s_logits, y, easy)
    fa = args.lambda_fa * fa_loss(s_branches, t_branches)
    loss_s = kd + args.lambda_ce * ce + fa
    # the perturbation: one sign-gradient step on the images, through student and teacher (as the reference)
    x_p = (x + args.eps * torch.sign(torch.autograd.grad(loss_s, x, retain_graph=True)[0])).detach()
    with torch.no_grad():
        t_logits_p, t_branches_p, _ = t_taps(teacher, x_p)
    s_logits_p, s_branches_p, _ = s_taps(student, x_p)
    loss_p = kd_loss(s_logits_p, t_logits_p, args.temperature, args.kd_alpha) + args.lambda_ce * easy_ce(
        s_logits_p, y, easy)  # the FA term on the perturbed batch: --fa-pert 1 (the reference: on ImageNet only)
    if args.fa_pert:
        loss_p = loss_p + args.lambda_fa * fa_loss(s_branches_p, t_branches_p)
    cam = torch.zeros((), device=x.device)
    if args.lambda_cam:
        cam_t = grad_cam(t_logits, t_last, x.shape[-2:]).detach()
        cam = F.mse_loss(grad_cam(s_logits, s_last, x.shape[-2:]), cam_t)
    loss = loss_s + args.lambda_pert * loss_p + args.lambda_cam * cam
    parts = {"kd": kd, "ce": ce, "fa": fa, "loss_p": loss_p, "cam": cam, "easy_frac": easy.float().mean() * 100,
             "teacher_acc": (t_logits.argmax(1) == y).float().mean() * 100}
    return loss, parts


if __name__ == "__main__":
    args = parse()
    teacher, info, test, run, teacher_top1 = setup(args, evaluate_only=args.epochs == 0)  # --epochs 0: teacher only
    device, num_classes = torch.device(args.device), NUM_CLASSES[args.dataset]
    images, labels = synthesize(args, teacher, args.synthetic or os.path.join(run.dir, "synthetic.pt"), device,
                                num_classes, run.teacher_sha256)  # stage 1, or its file
    order, pos = None, 0  # the synthetic set's order, drawn anew at every epoch's start and every pass

    student = build_student(args, teacher)
    generator = (GeneratorImageNet if args.dataset == "imagenet" else Generator)(
        num_classes, args.latent_dim).to(device).train()
    bn_stats, s_taps, t_taps = BNStats(teacher), Taps(student), Taps(teacher)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), lr=args.lr_s, momentum=args.momentum, nesterov=True,
                            weight_decay=args.weight_decay)
    milestones = lr_milestones(args.epochs, args.warmup_epochs, args.milestones, args.milestones_from)
    progress = Progress(args, run, test, teacher_top1,  # resumes all of these from the checkpoint with --resume
                        {"student": student, "generator": generator, "opt_s": opt_s, "opt_g": opt_g})
    # --amp bf16 / --compile, in place (common.py); off by default. Grad-CAM differentiates the logits by the last
    # conv's output, which a compiled forward does not expose: with it on, teacher and student stay eager
    eager = (teacher, student) if args.lambda_cam else ()
    if args.compile and eager:
        print("note: --compile leaves the teacher and student eager (Grad-CAM needs their inner activations; "
              "--lambda-cam 0 compiles them too)")
    accelerate(args, teacher, student, generator, eager=eager)

    for epoch in range(progress.start_epoch, args.epochs):
        warmup = epoch < args.warmup_epochs
        set_calibrating(student, warmup)  # activation ranges follow the generator's images during warm-up only
        factor = 0.1 ** sum(epoch >= m for m in milestones)
        set_lr(opt_g, args.lr_g * factor)
        set_lr(opt_s, args.lr_s * factor)
        for it in progress.iterate(epoch, range(args.iters_per_epoch), args.iters_per_epoch):
            if warmup:
                # ALGO LOGIC: warm-up: the GDFQ generator step (CE + 0.1 BNS); its images calibrate the student
                z = torch.randn(args.calib_batch, args.latent_dim, device=device)
                y = torch.randint(0, num_classes, (args.calib_batch,), device=device)
                x = generator(z, y)
                bn_stats.active = True
                t_logits = teacher(x)
                bn_stats.active = False
                mean_l, var_l = bn_stats()
                ce_g = F.cross_entropy(t_logits, y)
                loss_g = ce_g + 0.1 * (mean_l + var_l)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                with torch.no_grad():
                    student(x.detach())
                progress.add("losses/loss_G", loss_g)
                progress.add("charts/teacher_acc_gen", (t_logits.argmax(1) == y).float().mean() * 100)
                continue
            # ALGO LOGIC: fine-tuning on the synthetic set (a new order on every pass and epoch), augmented, low-passed
            if it == 0 or pos + args.batch_size > len(images):
                order, pos = torch.randperm(len(images), device=device), 0
            idx = order[pos:pos + args.batch_size]
            pos += args.batch_size
            x = random_resized_crop(images[idx])
            flip = torch.rand(len(x), device=device) < 0.5
            x = low_pass(torch.where(flip[:, None, None, None], x.flip(3), x), args.d_zero)
            loss, parts = finetune_losses(args, student, teacher, s_taps, t_taps, x, labels[idx])
            opt_s.zero_grad(set_to_none=True)
            loss.backward(inputs=list(student.parameters()))  # not on to the images through the teacher: unused
            opt_s.step()
            progress.add("losses/loss_S", loss)
            for k, v in parts.items():
                progress.add(("charts/" if k in ("easy_frac", "teacher_acc") else "losses/") + k, v)

        progress.end_epoch(epoch, student, {"lr_S": args.lr_s * factor, "lr_G": args.lr_g * factor},
                           args.iters_per_epoch * (args.calib_batch if warmup else args.batch_size), warmup,
                           calibration_done=epoch == args.warmup_epochs - 1)

    progress.finish(student, args.teacher_depth, num_classes, {  # what makes this run's cell comparable
        "quantizer": "zeroq: weights per output channel (min/max), activations per tensor (calibrated in the warm-up, "
                     "then fixed and clamped)", "activation_ranges": f"{args.act_ema} EMA",
        "train_data": f"synthetic: {args.num_images} images x {args.syn_iters} Adam steps, then fixed",
        "iterations": args.epochs * args.iters_per_epoch, "batch": args.batch_size,
        "teacher_passes_per_iteration": "fine-tuning: 2 forward (clean with input gradient, perturbed), backward "
                                        "to the input twice (perturbation, Grad-CAM); synthesis: "
                                        f"{args.num_images * args.syn_iters} image forward+backward in all"})
