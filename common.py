"""cleanqd shared infrastructure: CIFAR ResNet + weight loaders, the ZSQ quantizer, CIFAR data, evaluation,
seeding, and run / checkpoint helpers. No method logic lives here (see docs/protocol.md)."""
import argparse
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__version__ = "0.1.0"
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
CIFAR = ("cifar10", "cifar100")
IMAGENET_ARCHS = ("resnet18", "resnet50", "mobilenet_v2")  # torchvision's models (--arch, with --dataset imagenet)


# ----------------------------------------------------------------------------------------------------------
# Errors: bad input ends the program with one line on stderr and exit code 2, never a traceback.
class UserError(Exception):
    """An error the user can fix (bad flag, missing file, offline download); printed as one line, exit 2."""


def die(msg, code=2):
    """Print `error: msg` on one line to stderr and exit with `code`."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help shows every flag's default (the papers' values are the point of the scripts), unless its help text
    already says what the default is."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is argparse.SUPPRESS or not action.option_strings:
            return h
        if action.default is None:
            return h + " (default: none)"
        if isinstance(action.default, bool) and not action.default:
            return h + " (default: off)"
        d = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return h + f" (default: {d})".replace("%", "%%")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a single line and exit code 2 (no usage dump), and whose --help shows defaults."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        die(f"{self.prog}: {message} (see --help)")

    def given(self, argv=None):
        """The flags given on the command line (dest -> value), without the defaults."""
        saved = [(a, a.default) for a in self._actions]
        try:
            for a, _ in saved:
                a.default = argparse.SUPPRESS
            return vars(self.parse_args(argv))
        finally:
            for a, d in saved:
                a.default = d


def method_name(file):
    """A script's method name: its file name without .py (CleanRL's convention), so a renamed copy is a new method
    with its own run names, messages and grid rows."""
    return os.path.splitext(os.path.basename(file))[0]


def at_least(least):
    """An argparse type: an int >= least (else a one-line error naming the flag)."""
    def parse(text):
        v = int(text)
        if v < least:
            raise argparse.ArgumentTypeError(f"{v} must be at least {least}")
        return v
    parse.__name__ = "int"  # argparse says "invalid int value" for a non-number
    return parse


def add_common_args(p, method, datasets=CIFAR):
    """The command-line contract every cleanqd script shares (data, teacher, bits, seeding, run dirs); `method`
    names the runs (pass method_name(__file__)); `datasets`: those the script supports (CIFAR, or CIFAR and
    "imagenet", which needs no training data: the zero-shot methods)."""
    imagenet = "imagenet" in datasets
    p.add_argument("--dataset", default="cifar10", choices=list(datasets), help="dataset")
    p.add_argument("--wbits", type=int, default=4, help="weight bit-width")
    p.add_argument("--abits", type=int, default=None, help="activation bit-width (default: --wbits)")
    p.add_argument("--data-dir", default="./data", help="folder holding cifar-10-batches-py/ or cifar-100-python/"
                   + (" (CIFAR), or ImageNet's val/<wnid>/*.JPEG folders (ImageNet)" if imagenet else ""))
    p.add_argument("--teacher", default=None,
                   help="CIFAR: 'pytorchcv' (the papers' teacher, downloaded; the default), 'chenyaofo' (downloaded) "
                        "or a path to a .pth" + ("; ImageNet: 'torchvision' (torchvision's IMAGENET1K_V1 weights, "
                                                 "downloaded; the default), 'pytorchcv' (the papers' teachers, "
                                                 "downloaded) or a path to a state_dict of --arch" if imagenet else ""))
    p.add_argument("--teacher-depth", type=int, default=20, help="ResNet depth of the CIFAR teacher (20/32/44/56/110)")
    if imagenet:
        p.add_argument("--arch", default=None, choices=IMAGENET_ARCHS,
                       help="the ImageNet teacher's architecture, torchvision's (default: resnet18; ImageNet only)")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="ImageNet: worker processes that decode the validation images")
    p.add_argument("--eval-norm", default="teacher", choices=["teacher", "dataset"],
                   help="test-set normalisation: the teacher's own constants, or the GDFQ-family dataset statistics")
    p.add_argument("--seed", type=int, default=0, help="random seed (python, numpy, torch)")
    p.add_argument("--deterministic", action="store_true", help="use deterministic algorithms (slower on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--out-dir", default="runs", help="parent folder of the run directory")
    p.add_argument("--run-name", default=None, help="run directory name (default: dataset__method__wXaY__seedS__time)")
    p.add_argument("--eval-every", type=at_least(1), default=1,
                   help="evaluate on the test set every N epochs (and last)")
    p.add_argument("--save-model", action="store_true", help="also save the quantized student as model.pt")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the logged metrics as TensorBoard scalars under the run directory "
                        "(needs the optional tensorboard package)")
    p.add_argument("--track", action="store_true",
                   help="also log to Weights & Biases: the same scalars as metrics.jsonl, the args as its config and "
                        "the run's code (needs the optional wandb package; WANDB_MODE=offline logs locally)")
    p.add_argument("--wandb-project", default="cleanqd", help="--track: the W&B project")
    p.add_argument("--wandb-entity", default=None, help="--track: the W&B entity (team or user; default: yours)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop cleanly after this epoch (resumable with --resume), e.g. for time-limited jobs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models (training steps and evaluation); the first iterations pay the "
                        "compile time, reported on its own line")
    p.add_argument("--amp", default="off", choices=["off", "bf16"],
                   help="bf16 autocast for the models' convolutions and matmuls (quantizers, BN statistics and losses "
                        "stay float32); off: float32 throughout, the default and the published protocol")
    p.set_defaults(method=method)
    return p


# Interruptions: Ctrl-C (SIGINT) and SIGTERM (what schedulers send before a time limit) end the run with one line
# that names the last checkpoint and the exact --resume command, exit code 130 / 143. A signal that arrives while an
# epoch's metrics and checkpoint are being written waits until they are written.
class Interrupted(BaseException):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_INTERRUPT = {"defer": False, "pending": None, "where": None}  # `where`: a callable that describes the run's state


def describe_interrupt(where):
    """What an interruption says about the run from now on: `where()` returns the state and what to do (e.g. a
    stage before the first epoch that keeps its own progress); Progress replaces it when the epochs start."""
    _INTERRUPT["where"] = where


def _on_signal(signum, frame):
    if _INTERRUPT["defer"]:
        _INTERRUPT["pending"] = signum
    else:
        raise Interrupted(signum)


def script_name():
    """The file this program was started from (a renamed copy of a script names itself)."""
    return os.path.basename(main_script())


def _excepthook(kind, value, tb):
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    if issubclass(kind, (KeyboardInterrupt, Interrupted)):
        signum = value.signum if isinstance(value, Interrupted) else signal.SIGINT
        where = _INTERRUPT["where"]() if _INTERRUPT["where"] else "before training started; nothing to resume"
        sys.stdout.write("\n" if sys.stdout.isatty() else "")
        sys.stdout.flush()
        print(f"interrupted ({signal.Signals(signum).name}) {where}", file=sys.stderr, flush=True)
        os._exit(128 + int(signum))
    sys.__excepthook__(kind, value, tb)


# What a --resume may change: where and how fast it runs, how often it evaluates, what it writes on the side. Every
# other flag given with --resume must equal the saved run's.
RESUME_MAY_CHANGE = {"resume", "device", "threads", "tensorboard", "stop_after", "eval_every", "data_dir", "compile",
                     "track", "wandb_project", "wandb_entity", "workers"}


def _fmt_flag(v):
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def _recipe_text(v):
    if isinstance(v, dict):  # per architecture
        vals = list(v.values())
        if all(x == vals[0] for x in vals):
            return _fmt_flag(vals[0])
        return ", ".join(f"{a}: {_fmt_flag(x)}" for a, x in v.items())
    return _fmt_flag(v)


def parse_args(p, argv=None, bits=(2, 8), dataset_defaults=None):
    """Parse, validate the shared flags, and merge with args.json when --resume is given. `dataset_defaults`:
    {dataset: {dest: value, or {arch: value}}}, a dataset's own recipe, which replaces the defaults of the flags not
    given on the command line (a resumed run keeps its saved values); --help shows them. From here on an uncaught
    UserError ends the program with one line and exit code 2."""
    sys.excepthook = _excepthook
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    for dataset, table in (dataset_defaults or {}).items():
        for action in p._actions:
            if action.dest in table and action.help and f"{dataset}:" not in action.help:
                action.help += f" [{dataset}: {_recipe_text(table[action.dest])}]".replace("%", "%%")
    args = p.parse_args(argv)
    if not args.resume and args.dataset in (dataset_defaults or {}):
        given = p.given(argv)
        arch = getattr(args, "arch", None) or IMAGENET_ARCHS[0]
        for k, v in dataset_defaults[args.dataset].items():
            if k not in given:
                setattr(args, k, v[arch] if isinstance(v, dict) else v)
    if args.resume:
        path = os.path.join(args.resume, "args.json")
        if not os.path.isfile(path):
            die(f"--resume {args.resume}: no args.json there (not a run directory)")
        if not os.path.isfile(os.path.join(args.resume, "checkpoint.pt")):
            die(f"--resume {args.resume}: no checkpoint.pt there (the run ended before its first epoch)")
        with open(path) as f:
            saved = json.load(f)
        dests = {a.dest for a in p._actions}
        given = {k: v for k, v in p.given(argv).items() if k in dests}
        for k, v in given.items():  # a resumed run continues the saved one: its training flags cannot change
            if k not in RESUME_MAY_CHANGE and k in saved and v != saved[k]:
                die(f"--resume {args.resume}: --{k.replace('_', '-')} {_fmt_flag(v)} differs from the saved run's "
                    f"{_fmt_flag(saved[k])}; drop the flag, or start a new run (flags that may change on resume: "
                    + ", ".join("--" + f.replace("_", "-") for f in sorted(RESUME_MAY_CHANGE - {"resume"})) + ")")
        # this session's device, threads and --stop-after (given or default); --tensorboard can be switched on, not
        # off; --eval-every, --data-dir and --workers as given, else as saved
        keep = {"device": args.device, "threads": args.threads, "stop_after": args.stop_after,
                "tensorboard": args.tensorboard or saved.get("tensorboard", False),
                "track": args.track or saved.get("track", False),
                **{k: getattr(args, k) for k in ("wandb_project", "wandb_entity")},
                **{k: given[k] for k in ("eval_every", "data_dir", "workers") if k in given}}
        args = argparse.Namespace(**{**vars(args), **saved, **keep, "resume": args.resume})  # new flags: default
    if args.abits is None:
        args.abits = args.wbits
    imagenet = args.dataset == "imagenet"
    if not imagenet and getattr(args, "arch", None):
        die(f"--arch {args.arch} applies to --dataset imagenet; a CIFAR teacher is chosen with --teacher-depth")
    if imagenet:
        args.arch = args.arch or IMAGENET_ARCHS[0]
    if args.teacher is None:
        args.teacher = "torchvision" if imagenet else "pytorchcv"
    if imagenet and args.eval_norm != "teacher":
        die("--eval-norm dataset is CIFAR's (the GDFQ family's dataset statistics); ImageNet evaluates with the "
            "ImageNet mean and std")
    if args.teacher in ("torchvision", "chenyaofo") and args.teacher != ("torchvision" if imagenet else "chenyaofo"):
        die(f"--teacher {args.teacher} has no {args.dataset} weights; use "
            + ("'torchvision', 'pytorchcv' or a path" if imagenet else "'pytorchcv', 'chenyaofo' or a path"))
    lo, hi = bits
    for name in ("wbits", "abits"):
        v = getattr(args, name)
        if not (lo <= v <= hi):
            die(f"--{name} {v} is out of range: this quantizer supports {lo} to {hi} bits")
    if getattr(args, "tensorboard", False):
        try:
            importlib.import_module("torch.utils.tensorboard")  # needs the tensorboard package
        except ImportError:
            die("--tensorboard needs the tensorboard package: pip install tensorboard")
    if getattr(args, "track", False):
        try:
            importlib.import_module("wandb")
        except ImportError:
            die("--track needs the wandb package: pip install wandb (WANDB_MODE=offline logs without an account)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ----------------------------------------------------------------------------------------------------------
# Model: pytorchcv CIFARResNet topology (option-B shortcuts), torchvision-style parameter names.
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN body + (identity | conv1x1-BN) shortcut, then ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        body = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu2(body + short)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2). `forward(x)` gives logits; `forward_features(x)` also the intermediate features."""

    def __init__(self, depth=20, num_classes=10):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise UserError(f"ResNet depth {depth} is not 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.depth, self.num_classes = depth, num_classes
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        cin, stages = 16, []
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.forward_features(x)[0]

    def forward_features(self, x):
        """Return (logits, feats): feats["stages"] = the 3 stage outputs, feats["pool"] = the pooled feature."""
        x = self.relu(self.bn1(self.conv1(x)))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            stages.append(x)
        pool = x.mean((2, 3))
        return self.fc(pool), {"stages": stages, "pool": pool}


# A 3x3 tap d (0, 1, 2) of the conv on the upsampled grid lands on tap k (0..3) of a stride-2 transposed conv of the
# low-resolution input: output row 2i reads input rows i-1 (tap 3 = w0) and i (tap 1 = w1 + w2), row 2i+1 reads rows
# i (tap 2 = w0 + w1) and i+1 (tap 0 = w2). Row k of this matrix lists the 3x3 taps that sum into tap k.
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


class UpsampleConv3x3(nn.Conv2d):
    """Nearest x2 upsampling followed by a 3x3 conv (padding 1), computed without the upsampled tensor.

    Same parameters and the same function as `Conv2d(cin, cout, 3, padding=1)(interpolate(x, scale_factor=2))`
    (equal to float rounding): one stride-2 transposed conv of the low-res input with 4x4 taps that are sums of the
    3x3 taps (_UPSAMPLE_TAPS), 16 taps per 4 outputs instead of 36: about 2x fewer FLOPs. The bias is added
    apart: oneDNN's bias gradient of a transposed conv costs about as much as the conv (docs/speed.md)."""

    def __init__(self, cin, cout, bias=True):
        super().__init__(cin, cout, 3, 1, 1, bias=bias)
        self.register_buffer("taps", torch.tensor(_UPSAMPLE_TAPS), persistent=False)  # moves with the module

    def forward(self, x):
        a = self.taps.to(self.weight.dtype)
        k = torch.einsum("kd,oide,le->iokl", a, self.weight, a)  # [Ci, Co, 4, 4], conv_transpose2d's layout
        k = k.contiguous(memory_format=torch.channels_last)  # channels_last is faster on CPU (oneDNN) and GPU
        out = F.conv_transpose2d(x.contiguous(memory_format=torch.channels_last), k, stride=2, padding=1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


# Teacher weights: two public layouts of the same topology.
TEACHERS = {  # (url, hash kind, expected prefix)
    ("pytorchcv", "cifar10"): ("https://github.com/osmr/imgclsmob/releases/download/v0.0.163/"
                               "resnet20_cifar10-0597-9b0024ac.pth.zip", "sha1", "9b0024ac"),
    ("pytorchcv", "cifar100"): ("https://github.com/osmr/imgclsmob/releases/download/v0.0.180/"
                                "resnet20_cifar100-2964-a5322afe.pth.zip", "sha1", "a5322afe"),
    ("chenyaofo", "cifar10"): ("https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/"
                               "cifar10_resnet20-4118986f.pt", "sha256", "4118986f"),
    ("chenyaofo", "cifar100"): ("https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/"
                                "cifar100_resnet20-23dac2f1.pt", "sha256", "23dac2f1"),
}
NORMS = {  # (mean, std)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # pytorchcv (both) and chenyaofo CIFAR-10
    "chenyaofo-cifar100": ((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)),
    # the dataset statistics the GDFQ-family repos evaluate with (their dataloader.py)
    "dataset-cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "dataset-cifar100": ((0.50705882, 0.48666667, 0.44078431), (0.26745098, 0.25568627, 0.27607843)),
}


def pytorchcv_to_native(sd):
    """Rename pytorchcv CIFARResNet keys (features.stageS.unitU...) to this module's names."""
    out = {}
    for k, v in sd.items():
        n = k.replace("features.init_block.conv.", "conv1.").replace("features.init_block.bn.", "bn1.")
        if n.startswith("features.stage"):
            parts = n.split(".")  # features, stageS, unitU, rest...
            s, u = int(parts[1][5:]), int(parts[2][4:]) - 1
            rest = ".".join(parts[3:])
            rest = (rest.replace("body.conv1.conv.", "conv1.").replace("body.conv1.bn.", "bn1.")
                    .replace("body.conv2.conv.", "conv2.").replace("body.conv2.bn.", "bn2.")
                    .replace("identity_conv.conv.", "downsample.0.").replace("identity_conv.bn.", "downsample.1."))
            n = f"layer{s}.{u}.{rest}"
        if n.startswith("output."):
            n = "fc." + n[len("output."):]
        out[n] = v
    return out


def detect_layout(sd):
    """'pytorchcv' or 'chenyaofo' from the state_dict keys."""
    if any(k.startswith("features.") for k in sd):
        return "pytorchcv"
    if any(k.startswith("layer1.") for k in sd):
        return "chenyaofo"
    raise UserError(f"unrecognised teacher weights (first keys: {list(sd)[:3]}); expected the pytorchcv "
                    "or chenyaofo CIFAR ResNet layout")


def load_weights_strict(model, sd, what=None):
    """Load a native-named state_dict, every key used; a mismatch lists the differing keys and shapes."""
    own = model.state_dict()
    for k in own:  # old files may lack BN's num_batches_tracked counters; they do not affect the model
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def short(xs):
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")
        bits = [f"missing {short(missing)}" if missing else "", f"unexpected {short(unexpected)}" if unexpected else "",
                f"shape {short(shapes)}" if shapes else ""]
        what = what or f"ResNet-{model.depth} with {model.num_classes} classes"
        raise UserError(f"teacher weights do not match {what}: " + "; ".join(b for b in bits if b))
    model.load_state_dict(sd, strict=True)


def _download(url, kind, prefix, cache_dir):
    """Download url into cache_dir (unzipping a .zip), check the hash prefix, return the weight file path."""
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(url)[:-4] if url.endswith(".zip") else os.path.basename(url)
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(path) and os.environ.get("CLEANQD_OFFLINE"):
        raise UserError(f"teacher {name} is not in {cache_dir} and CLEANQD_OFFLINE is set; pass --teacher PATH")
    if not os.path.isfile(path):
        print(f"downloading {url}", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                blob = r.read()
        except Exception as e:  # noqa: BLE001 - any network failure is the same user-facing problem
            raise UserError(f"could not download the teacher from {url} ({type(e).__name__}: {e}); offline, pass "
                            "--teacher PATH to a local copy of that file (or of any CIFAR ResNet state_dict)") from e
        if url.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(blob)) as z:
                blob = z.read(name)
        digest = hashlib.new(kind, blob).hexdigest()
        if not digest.startswith(prefix):
            raise UserError(f"downloaded {name} has {kind} {digest[:8]}..., expected {prefix}...; not saved")
        with open(path + ".tmp", "wb") as f:
            f.write(blob)
        os.replace(path + ".tmp", path)
    return path


def _read_state_dict(path):
    """A state_dict from a .pth (a plain one, or {"state_dict": ...}; DataParallel's "module." dropped)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--teacher {path} is not a PyTorch weights file (one written by torch.save, loadable "
                        f"without running code): torch.load failed with {type(e).__name__}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--teacher {path} holds a {type(sd).__name__}, not a state_dict (a dict of parameter "
                        "tensors, e.g. model.state_dict() saved with torch.save)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_teacher(spec, dataset, depth=20, cache_dir=None, arch=None):
    """Build the FP teacher from 'pytorchcv', 'chenyaofo' or a local path. Returns (model, info) where info
    holds the file, layout and the input normalisation (mean, std) that the weights were trained with."""
    if dataset == "imagenet":
        return load_imagenet_teacher(spec, arch or IMAGENET_ARCHS[0], cache_dir)
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cleanqd")
    if spec in ("pytorchcv", "chenyaofo"):
        if depth != 20:
            raise UserError(f"--teacher {spec} downloads ResNet-20 only; pass a local file for depth {depth}")
        path = _download(*TEACHERS[(spec, dataset)], cache_dir)
    else:
        path = spec
        if not os.path.isfile(path):
            raise UserError(f"--teacher {path}: no such file (use 'pytorchcv', 'chenyaofo' or a path to a .pth)")
    sd = _read_state_dict(path)
    layout = detect_layout(sd)
    if layout == "pytorchcv":
        sd = pytorchcv_to_native(sd)
    model = CifarResNet(depth, NUM_CLASSES[dataset])
    load_weights_strict(model, sd)
    norm = NORMS["chenyaofo-cifar100" if (layout, dataset) == ("chenyaofo", "cifar100") else "cifar10"]
    model.eval()
    return model, {"path": os.path.abspath(path), "layout": layout, "mean": norm[0], "std": norm[1]}


# ImageNet teachers: torchvision's models. Their blocks call one ReLU module at two places (after the first BN and
# after the residual add): each place gets its own module here, so that each activation gets its own quantizer, as
# in the papers' pytorchcv models. Parameter names and state_dict keys are torchvision's.
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_TEACHERS = {  # torchvision's IMAGENET1K_V1 (the weights the field's tables used) and pytorchcv's files
    ("torchvision", "resnet18"): "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ("torchvision", "resnet50"): "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ("torchvision", "mobilenet_v2"): "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    ("pytorchcv", "resnet18"): ("https://github.com/osmr/imgclsmob/releases/download/v0.0.153/"
                                "resnet18-0982-0126861b.pth.zip", "sha1", "0126861b"),
    ("pytorchcv", "resnet50"): ("https://github.com/osmr/imgclsmob/releases/download/v0.0.329/"
                                "resnet50-0633-b00d1c8e.pth.zip", "sha1", "b00d1c8e"),
}


def _basic_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu_out(self.bn2(self.conv2(out)) + identity)


def _bottleneck_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu_mid(self.bn2(self.conv2(out)))
    return self.relu_out(self.bn3(self.conv3(out)) + identity)


_TV_BLOCKS = {}


def imagenet_model(arch, num_classes=1000):
    """torchvision's `arch` (random weights), each ReLU place its own module; `.arch`, `.num_classes` and
    `.depth` (None) describe it."""
    import torchvision
    from torchvision.models import resnet
    if arch not in IMAGENET_ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose from {', '.join(IMAGENET_ARCHS)}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if not _TV_BLOCKS:
        _TV_BLOCKS[resnet.BasicBlock] = type("BasicBlock", (resnet.BasicBlock,), {"forward": _basic_forward})
        _TV_BLOCKS[resnet.Bottleneck] = type("Bottleneck", (resnet.Bottleneck,), {"forward": _bottleneck_forward})
    for m in model.modules():
        if type(m) in _TV_BLOCKS:
            m.__class__ = _TV_BLOCKS[type(m)]
            m.relu_out = nn.ReLU(inplace=True)
            if isinstance(m, resnet.Bottleneck):
                m.relu_mid = nn.ReLU(inplace=True)
    model.arch, model.num_classes, model.depth = arch, num_classes, None
    return model


def build_model(dataset, arch=None, depth=20):
    """The float network a run's teacher and student have: torchvision's `arch` on ImageNet, else a CIFAR ResNet."""
    if dataset == "imagenet":
        return imagenet_model(arch or IMAGENET_ARCHS[0])
    return CifarResNet(depth, NUM_CLASSES[dataset])


def residual_branches(model):
    """The modules whose outputs are the residual branches, before the add, in forward order: the last BatchNorm of
    every residual block (CIFAR and torchvision ResNets) or inverted residual with a skip (MobileNetV2)."""
    from torchvision.models import mobilenetv2, resnet
    out = []
    for m in model.modules():
        if isinstance(m, (BasicBlock, resnet.BasicBlock)):
            out.append(m.bn2)
        elif isinstance(m, resnet.Bottleneck):
            out.append(m.bn3)
        elif isinstance(m, mobilenetv2.InvertedResidual) and m.use_res_connect:
            out.append(m.conv[-1])
    return out


def classifier(model):
    """The model's classifier: its last Linear layer."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def logits_and_pooled(model, x):
    """(logits, the pooled feature the classifier reads) of one forward: a CIFAR ResNet's forward_features, else
    the input of the last Linear layer, read by a hook for this call."""
    if hasattr(model, "forward_features"):
        logits, feats = model.forward_features(x)
        return logits, feats["pool"]
    seen = []
    hook = classifier(model).register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return logits, full_precision(seen[-1])


def pytorchcv_resnet_to_torchvision(sd, model):
    """pytorchcv's ImageNet ResNet-18/50 keys (features.stageS.unitU.body.convK.{conv,bn}) to torchvision's. pytorchcv's
    ResNet-50 strides its bottlenecks' first 1x1 conv (ResNet v1), torchvision's the 3x3 (v1.5): the strides of
    `model` are moved to where pytorchcv has them, so that it computes what the papers' teacher computes."""
    out = {}
    for k, v in sd.items():
        n = k.replace("features.init_block.conv.conv.", "conv1.").replace("features.init_block.conv.bn.", "bn1.")
        if n.startswith("features.stage"):
            parts = n.split(".")
            s, u = int(parts[1][5:]), int(parts[2][4:]) - 1
            rest = ".".join(parts[3:])
            for i in (1, 2, 3):
                rest = rest.replace(f"body.conv{i}.conv.", f"conv{i}.").replace(f"body.conv{i}.bn.", f"bn{i}.")
            rest = rest.replace("identity_conv.conv.", "downsample.0.").replace("identity_conv.bn.", "downsample.1.")
            n = f"layer{s}.{u}.{rest}"
        out[n.replace("output.", "fc.", 1) if n.startswith("output.") else n] = v
    for m in model.modules():
        if hasattr(m, "conv3") and m.conv2.stride != (1, 1):  # a strided bottleneck: stride the 1x1, as pytorchcv
            m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
    return out


def load_imagenet_teacher(spec, arch, cache_dir=None):
    """torchvision's `arch` with 'torchvision' (IMAGENET1K_V1, downloaded into torch's hub cache as torchvision does),
    'pytorchcv' (the papers' files) or a local state_dict. Returns (model, info) as load_teacher."""
    model = imagenet_model(arch)
    if spec == "torchvision":
        url = IMAGENET_TEACHERS[("torchvision", arch)]
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.isfile(path):
            if os.environ.get("CLEANQD_OFFLINE"):
                raise UserError(f"teacher {os.path.basename(url)} is not in {os.path.dirname(path)} and "
                                "CLEANQD_OFFLINE is set; pass --teacher PATH")
            try:
                torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True)
            except Exception as e:  # noqa: BLE001 - any network or hash failure is the same user-facing problem
                raise UserError(f"could not download the teacher from {url} ({type(e).__name__}); offline, pass "
                                f"--teacher PATH to a local copy of that file") from e
        layout = "torchvision"
    elif spec == "pytorchcv":
        if ("pytorchcv", arch) not in IMAGENET_TEACHERS:
            raise UserError(f"--teacher pytorchcv has no {arch} here (its layout differs from torchvision's); use "
                            "'torchvision' or a path")
        path = _download(*IMAGENET_TEACHERS[("pytorchcv", arch)],
                         cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cleanqd"))
        layout = "pytorchcv"
    else:
        path, layout = spec, "torchvision"
        if not os.path.isfile(path):
            raise UserError(f"--teacher {path}: no such file (use 'torchvision', 'pytorchcv' or a path to a .pth)")
    sd = _read_state_dict(path)
    if layout == "pytorchcv" or any(k.startswith("features.init_block") for k in sd):
        sd, layout = pytorchcv_resnet_to_torchvision(sd, model), "pytorchcv"
    load_weights_strict(model, sd, f"torchvision {arch} with 1000 classes")
    return model.eval(), {"path": os.path.abspath(path), "layout": layout, "mean": IMAGENET_NORM[0],
                          "std": IMAGENET_NORM[1], "arch": arch}


def eval_normalisation(args, info):
    """The (mean, std) used to evaluate: the teacher's own (default) or the GDFQ-family dataset statistics."""
    if args.eval_norm == "dataset" and args.dataset != "imagenet":
        return NORMS[f"dataset-{args.dataset}"]
    return info["mean"], info["std"]


# ----------------------------------------------------------------------------------------------------------
# Quantizer (ZeroQ's, as used by the GDFQ family): asymmetric min/max fake quantization, identity STE.
def scale_zero(lo, hi, k):
    """ZeroQ's scale s = (2^k-1)/(hi-lo) and integer zero point z = round(s*lo) + 2^(k-1)."""
    s = (2 ** k - 1) / (hi - lo).clamp(min=1e-8)
    return s, torch.round(s * lo) + 2 ** (k - 1)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi, k):
        with torch.no_grad():
            s, z = scale_zero(lo, hi, k)
            q = (x * s).sub_(z).round_().clamp_(-(2 ** (k - 1)), 2 ** (k - 1) - 1)
            return q.add_(z).div_(s)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None  # identity straight-through: no mask, no gradient to the range


def fake_quant(x, lo, hi, k):
    """k-bit fake quantization of x on [lo, hi] (broadcastable tensors), identity straight-through gradient:
    s = (2^k-1)/(hi-lo), z = round(s*lo) + 2^(k-1), q = clamp(round(s*x - z), -2^(k-1), 2^(k-1)-1), x̂ = (q+z)/s."""
    return _FakeQuant.apply(x, lo, hi, k)


class _ReluFakeQuant(torch.autograd.Function):
    """fake_quant(relu(x)) (or relu6) in one function, equal to the two-step chain bit for bit, forward and backward.
    Rounding is monotone, so every x <= 0 gets the code of 0, c0 = clamp(-z), and (relu6) every x >= 6 the code of
    6: the activation is a narrower clamp of the codes, q = clamp(round(s*x - z), c0, c6), and needs no pass, no
    tensor of its own. Backward: the activation's mask (0 < x, and x < 6 for relu6; the quantizer's gradient is the
    identity), from the saved input."""

    @staticmethod
    def forward(ctx, x, lo, hi, k, six):
        ctx.six = six
        ctx.save_for_backward(x)
        with torch.no_grad():
            s, z = scale_zero(lo, hi, k)
            qmin, qmax = -(2 ** (k - 1)), 2 ** (k - 1) - 1
            c0 = (-z).clamp(qmin, qmax)
            c1 = (x.new_tensor(6.0) * s).sub_(z).round_().clamp_(qmin, qmax) if six else torch.full_like(z, qmax)
            q = (x * s).sub_(z).round_().clamp_min_(c0).clamp_max_(c1)  # clamp_(c0, c1): slow with tensor bounds
            return q.add_(z).div_(s)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        if ctx.six:
            return torch.ops.aten.hardtanh_backward(g, x, 0.0, 6.0), None, None, None, None
        return torch.ops.aten.threshold_backward(g, x, 0.0), None, None, None, None


def relu_fake_quant(x, lo, hi, k, six=False):
    """fake_quant(relu(x), lo, hi, k) (six: relu6(x)) in one function: the same values and gradients, two fewer
    passes over x and no stored ReLU output."""
    return _ReluFakeQuant.apply(x, lo, hi, k, six)


def weight_codes(w, k):
    """Integer codes of a weight tensor under per-output-channel min/max k-bit quantization (used by AIT)."""
    flat = w.detach().flatten(1)
    s, z = scale_zero(flat.amin(1, keepdim=True), flat.amax(1, keepdim=True), k)
    return (flat * s - z).round().clamp(-(2 ** (k - 1)), 2 ** (k - 1) - 1)


# Export contract (tools/export.py): a quantized module describes its quantizer with integer codes and scales, and
# the tool, which knows no method, writes them out. A weight quantizer's export_weight() returns
#   {"codes": int64 tensor (the weight's shape), "scale": float64 [Co] or [1], "zero": int64 [Co] or [1],
#    "qmin", "qmax", "code_step", "bits", "out_scale", "quantizer"}
# meaning  w_hat = scale * (codes - zero), with codes on qmin, qmin + code_step, ..., qmax, and the layer's output
# multiplied by out_scale. An activation quantizer's export_act() (a module in a ReLU's place) or export_input() (a
# layer that quantizes its own input) returns
#   {"relu", "offset", "step", "zero", "rounding": "nearest" | "ceil", "qmin", "qmax", "out_step", "out_zero",
#    "bits", "quantizer"}
# meaning  codes = clamp(R((relu?(x) - offset) / step) + zero, qmin, qmax),  x_hat = out_step * (codes - out_zero).
def zeroq_weight_export(w, k):
    """ZeroQ's per-output-channel weight quantizer as codes q in [-2^(k-1), 2^(k-1)-1], w_hat = (q + z) / s."""
    flat = w.detach().flatten(1)
    s, z = scale_zero(flat.amin(1), flat.amax(1), k)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = (w.detach() * s.view(shape)).sub_(z.view(shape)).round_().clamp_(-(2 ** (k - 1)), 2 ** (k - 1) - 1)
    return {"codes": q.long(), "scale": 1.0 / s.double(), "zero": (-z).long(), "qmin": -(2 ** (k - 1)),
            "qmax": 2 ** (k - 1) - 1, "code_step": 1, "bits": k, "out_scale": 1.0,
            "quantizer": "zeroq: asymmetric min/max per output channel"}


class QConv2d(nn.Conv2d):
    """Conv2d whose weight is fake-quantized per output channel (min/max of the current float weight)."""
    wbits = 8

    def export_weight(self):
        return zeroq_weight_export(self.weight, self.wbits)

    def forward(self, x):
        w = self.weight
        flat = w.detach().flatten(1)
        shape = (-1,) + (1,) * (w.dim() - 1)
        w_q = fake_quant(w, flat.amin(1).view(shape), flat.amax(1).view(shape), self.wbits)
        return self._conv_forward(x, w_q, self.bias)


class QLinear(nn.Linear):
    """Linear whose weight is fake-quantized per output row."""
    wbits = 8

    def export_weight(self):
        return zeroq_weight_export(self.weight, self.wbits)

    def forward(self, x):
        w = self.weight
        w_q = fake_quant(w, w.detach().amin(1, keepdim=True), w.detach().amax(1, keepdim=True), self.wbits)
        return F.linear(x, w_q, self.bias)


class QuantReLU(nn.Module):
    """ReLU followed by a per-tensor activation quantizer whose range is an EMA (momentum 0.9) of the batch
    min/max while `calibrating` is True (first update = batch value), frozen otherwise. ema="reference" is the
    reference code's EMA instead: it divides the whole running value by (1 - 0.9^t) at every update t, which
    inflates the range for the first ~150 updates (x100 to x4000 for updates 5-50) before it settles."""

    def __init__(self, abits, momentum=0.9, ema="plain", six=False):
        super().__init__()
        self.abits, self.momentum, self.calibrating, self.ema, self.six = abits, momentum, True, ema, six
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        if ema == "reference":
            self.register_buffer("beta_t", torch.ones(()))  # momentum^t after t updates

    def forward(self, x):
        x = full_precision(x)  # the quantizer runs in float32 (a bf16 input under --amp bf16 is cast up)
        if self.calibrating:
            with torch.no_grad():  # the range of relu(x) (relu6 in a ReLU6's place, MobileNetV2), read from x
                lo, hi = x.detach().aminmax()
                lo, hi = (lo.clamp(0, 6), hi.clamp(0, 6)) if self.six else (lo.clamp_min(0), hi.clamp_min(0))
                if self.ema == "reference":  # its float32 arithmetic, in its order
                    m = self.beta_t.new_tensor(self.momentum)
                    self.beta_t.mul_(m)
                    self.lo.copy_((self.lo * m + lo * (1 - m)) / (1 - self.beta_t))
                    self.hi.copy_((self.hi * m + hi * (1 - m)) / (1 - self.beta_t))
                else:
                    m = torch.where(self.initialised, self.momentum, 0.0)
                    self.lo.copy_(m * self.lo + (1 - m) * lo)
                    self.hi.copy_(m * self.hi + (1 - m) * hi)
                self.initialised.fill_(True)
        return relu_fake_quant(x, self.lo, self.hi, self.abits, self.six)

    def export_act(self):
        s, z = scale_zero(self.lo, self.hi, self.abits)
        return {"relu": True, "offset": 0.0, "step": 1.0 / s.item(), "zero": -int(z), "rounding": "nearest",
                "qmin": -(2 ** (self.abits - 1)), "qmax": 2 ** (self.abits - 1) - 1, "out_step": 1.0 / s.item(),
                "out_zero": -int(z), "bits": self.abits, **({"clip": 6.0} if self.six else {}),
                "quantizer": "zeroq: asymmetric per tensor, calibrated range (fixed)"}

    def extra_repr(self):
        return f"abits={self.abits}, momentum={self.momentum}, ema={self.ema}" + (", relu6" if self.six else "")


def swap_modules(model, fn):
    """Replace, recursively and in place, every submodule m for which fn(m) returns a module (None: recurse)."""
    for name, child in model.named_children():
        new = fn(child)
        if new is None:
            swap_modules(child, fn)
        else:
            setattr(model, name, new)
    return model


def quantize_model(model, wbits, abits, act_ema="plain"):
    """A quantized copy of `model`: every Conv2d/Linear becomes QConv2d/QLinear at `wbits` (same float weights; the
    first and last layers too, as the GDFQ family's references) and every ReLU / ReLU6 a QuantReLU at `abits` (19 in
    ResNet-20) whose range calibrates with `act_ema`. BN stays float and unfused. Any classifier built from these
    modules works (torchvision's ResNets and MobileNetV2 included). The copy is on the model's device, in
    channels_last memory format (faster convolutions on CPU and GPU)."""
    import copy

    def swap(child):
        if isinstance(child, nn.Conv2d):
            new = QConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                          child.padding, child.dilation, child.groups, child.bias is not None)
        elif isinstance(child, nn.Linear):
            new = QLinear(child.in_features, child.out_features, child.bias is not None)
        elif isinstance(child, (nn.ReLU, nn.ReLU6)):
            return QuantReLU(abits, ema=act_ema, six=isinstance(child, nn.ReLU6))
        else:
            return None
        new.load_state_dict(child.state_dict())
        new.wbits = wbits
        return new
    q = swap_modules(copy.deepcopy(model), swap)
    return q.to(next(model.parameters()).device, memory_format=torch.channels_last)


def set_calibrating(model, on):
    """Turn activation-range calibration on (ranges follow the data) or off (ranges frozen)."""
    for m in model.modules():
        if isinstance(m, QuantReLU):
            m.calibrating = on


# ----------------------------------------------------------------------------------------------------------
# Data: CIFAR splits as uint8 tensors, batched normalisation / augmentation on tensors.
DATA_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _read_split(root, dataset, train):
    if dataset == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = "labels"
    else:
        files, key = ["train" if train else "test"], "fine_labels"
    xs, ys = [], []
    for name in files:
        with open(os.path.join(root, name), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(d[key])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)


def load_cifar(dataset, data_dir, train, download=True):
    """(images uint8 [N,3,32,32], labels int64 [N]) of one split from data_dir in the official python layout.
    Local copies are read without any checksum; if absent, torchvision downloads the official archive."""
    if dataset not in DATA_DIRS:
        raise UserError(f"unknown dataset {dataset!r}; choose from {sorted(DATA_DIRS)}")
    root = os.path.join(data_dir, DATA_DIRS[dataset])
    if not os.path.isdir(root) and download and not os.environ.get("CLEANQD_OFFLINE"):
        try:
            import torchvision
            cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
            cls(data_dir, train=train, download=True)
        except Exception as e:  # noqa: BLE001 - offline, or torchvision missing: same advice
            raise UserError(f"{dataset} not found in {os.path.abspath(root)} and the download failed "
                            f"({type(e).__name__}); put the official python-layout folder there or pass "
                            "--data-dir") from e
    if not os.path.isdir(root):
        raise UserError(f"{dataset} not found in {os.path.abspath(root)} (downloads disabled); put the official "
                        "python-layout folder there or pass --data-dir")
    try:
        return _read_split(root, dataset, train)
    except (OSError, KeyError, pickle.UnpicklingError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {dataset} {'train' if train else 'test'} split from {os.path.abspath(root)} "
                        f"({type(e).__name__}: {e}); expected the official python layout") from e


def normalise(x_uint8, mean, std):
    """uint8 [N,3,H,W] -> float32 standardised with per-channel mean/std (sequences, or tensors on x's device)."""
    m = torch.as_tensor(mean, device=x_uint8.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.float().div_(255.0) - m) / s


def augment(x, generator=None, pad=4):
    """Random crop (zero padding `pad`) + horizontal flip, batched on a [B,C,H,W] tensor. Applied to the uint8
    images, before normalisation, so the padding is black, as torchvision's RandomCrop(32, padding=4) pads them."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)  # drawn where x lives: no copy
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy[:, None] + ar_h[None]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + ar_w[None]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    out = xp.gather(3, cols)
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)


def train_batches(x_uint8, batch_size, mean, std, device, augment_images=True, labels=None, drop_last=True,
                  memory_format=torch.channels_last):
    """One epoch over a uint8 training split in a random order (torch's RNG on `device`): randomly cropped (black
    padding) and flipped, then normalised batches on `device` (the last partial batch is dropped unless
    drop_last=False, as torch's DataLoader by default keeps it). Yields x, or
    (x, y) when labels are given. Keep the split (and labels) on `device` (`.to(device)` once): then nothing crosses
    from the host per batch, and on a GPU no step waits for it."""
    x_uint8 = x_uint8.to(device)  # no-op when it already lives there
    labels = labels.to(device) if labels is not None else None
    m = torch.tensor(mean, device=device)
    s = torch.tensor(std, device=device)
    perm = torch.randperm(len(x_uint8), device=device)
    for i in range(0, len(perm) - (batch_size - 1 if drop_last else 0), batch_size):
        idx = perm[i:i + batch_size]
        x = x_uint8[idx]
        x = normalise(augment(x) if augment_images else x, m, s).contiguous(memory_format=memory_format)
        yield x if labels is None else (x, labels[idx])


# ----------------------------------------------------------------------------------------------------------
# Evaluation
@torch.no_grad()
def evaluate(model, x, y, batch_size=100):
    """Top-1 accuracy (percent) of model on normalised images x (already on the model's device)."""
    return evaluate_batches(model, ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)),
                            x.device)


@torch.no_grad()
def evaluate_batches(model, batches, device):
    """Top-1 accuracy (percent) of model on (normalised images, labels) batches, moved to `device`."""
    was_training = model.training
    calib = [m for m in model.modules() if isinstance(m, QuantReLU) and m.calibrating]
    set_calibrating(model, False)  # evaluation never moves the activation ranges
    model.eval()
    correct, n = torch.zeros((), dtype=torch.long, device=device), 0
    for x, y in batches:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        correct += (model(x).argmax(1) == y.to(device, non_blocking=True)).sum()
        n += len(y)
    model.train(was_training)
    for m in calib:
        m.calibrating = True
    return 100.0 * correct.item() / max(n, 1)


def imagenet_wnids():
    """The 1000 ImageNet-1k class folder names (WordNet ids), sorted: class i is the i-th (torchvision's ImageFolder
    order of the full validation set, the order of every ImageNet classifier's outputs)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_wnids.txt")) as f:
        return f.read().split()


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def imagenet_val_files(data_dir):
    """[(path, label)] of DATA_DIR/val/<wnid>/<image>, labels by the standard sorted-wnid index (a folder holding
    only some classes keeps the full set's labels)."""
    root = os.path.join(data_dir, "val")
    if not os.path.isdir(root):
        raise UserError(f"no ImageNet validation set in {os.path.abspath(root)}: expected val/<wnid>/*.JPEG (the "
                        "usual folder layout, one folder per class; ImageNet is not downloadable without an "
                        "image-net.org account); pass --data-dir")
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    unknown = [d for d in folders if d not in index]
    if unknown:
        raise UserError(f"{root} has folders that are not ImageNet-1k class ids (wnids such as n01440764): "
                        f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    files = [(os.path.join(root, d, f), index[d]) for d in folders for f in sorted(os.listdir(os.path.join(root, d)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UserError(f"{root} holds no images (expected val/<wnid>/*.JPEG)")
    return files


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files, mean, std):
        from torchvision import transforms
        self.files = files
        self.transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                             transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.files[i]
        try:
            with Image.open(path) as im:
                return self.transform(im.convert("RGB")), label
        except OSError as e:
            raise UserError(f"cannot read the image {path} ({type(e).__name__}: {e})") from e


class ImageNetEval:
    """The ImageNet validation set, decoded by `--workers` processes per evaluation (resize 256, centre crop 224,
    mean/std): the interface of EvalData."""

    def __init__(self, args, info):
        self.files = imagenet_val_files(args.data_dir)
        self.mean, self.std = info["mean"], info["std"]
        self.y = torch.tensor([label for _, label in self.files])
        self.device, self.workers = torch.device(args.device), args.workers

    def top1(self, model):
        loader = torch.utils.data.DataLoader(_ImageFiles(self.files, self.mean, self.std), batch_size=100,
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda")
        return evaluate_batches(model, loader, self.device)


class EvalData:
    """The test split, normalised once and kept on the device, so evaluation costs the forward pass only."""

    def __init__(self, args, info):
        x, self.y = load_cifar(args.dataset, args.data_dir, train=False)
        self.mean, self.std = eval_normalisation(args, info)
        self.x = normalise(x, self.mean, self.std).to(args.device).contiguous(memory_format=torch.channels_last)
        self.y = self.y.to(args.device)

    def top1(self, model):
        return evaluate(model, self.x, self.y)


# ----------------------------------------------------------------------------------------------------------
# Seeding, runs, logs, checkpoints
def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (all devices); optionally force deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state():
    """Every RNG's state as tensors and plain types, so that a checkpoint loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
         "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    """Restore rng_state()'s states (or those of a checkpoint written before they were stored as tensors)."""
    version, internal, gauss = s["python"]
    internal = internal.tolist() if isinstance(internal, torch.Tensor) else internal
    random.setstate((version, tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# numpy arrays are the one thing beyond tensors and plain values that a checkpoint of an earlier version holds (its
# RNG state); rebuilding an array runs no code of the file's choosing
_NUMPY_ARRAYS = [np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_weights_only(path, what):
    """torch.load with weights_only=True: opening someone's file cannot run code; a file that needs more is refused
    with one line."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path} as a {what} ({type(e).__name__}); it was written by another version or "
                        "holds more than tensors and plain values, which cleanqd does not unpickle") from e


def provenance(script):
    """Which code made a run: the git commit of the folder holding the script and whether the tree differed from it
    (modified tracked files, and untracked ones: a copied script not yet committed makes the run dirty), or, outside
    git, a SHA-256 of the script and common.py. The exact code is also saved in the run directory (save_code)."""
    folder = os.path.dirname(os.path.abspath(script))
    try:
        run = dict(cwd=folder, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], **run).stdout.splitlines()
        untracked = sum(line.startswith("??") for line in status)
        return {"git_commit": commit, "git_dirty": bool(status), "git_modified": len(status) - untracked,
                "git_untracked": untracked}
    except (OSError, subprocess.SubprocessError):
        h = hashlib.sha256()
        for f in (script, __file__):
            with open(f, "rb") as fh:
                h.update(fh.read())
        return {"code_sha256": h.hexdigest()}


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_code(run_dir, files):
    """Copy the code that runs (the script and common.py) into RUN_DIR/code/, as airbench keeps its own source.
    Returns {file name: SHA-256} of the files running now. A resumed run whose code differs from the saved copy keeps
    both: the new files go to code/resumed-TIME/ (one line says so)."""
    code = os.path.join(run_dir, "code")
    files = [f for f in files if f and f.endswith(".py") and os.path.isfile(f)]
    hashes = {os.path.basename(f): sha256_of(f) for f in files}
    saved = {n: sha256_of(os.path.join(code, n)) for n in hashes if os.path.isfile(os.path.join(code, n))}
    if saved == hashes:
        return hashes
    dest = code if not saved else os.path.join(code, f"resumed-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(dest, exist_ok=True)
    for f in files:
        shutil.copy2(f, os.path.join(dest, os.path.basename(f)))
    if saved:
        print(f"note: the code differs from the code this run started with ({code}/); the new files are kept in "
              f"{dest}/ (tools/code_diff.py compares runs)")
    return hashes


class Run:
    """A run directory: args.json, metrics.jsonl (one JSON object per evaluation), checkpoint.pt (atomic),
    summary.json and, on request, model.pt. `Run(args)` creates it, or reopens it when args.resume is set."""

    def __init__(self, args):
        if args.resume:
            self.dir = args.resume
        else:
            dataset = f"imagenet-{args.arch}" if args.dataset == "imagenet" else args.dataset
            name = args.run_name or (f"{dataset}__{args.method}__w{args.wbits}a{args.abits}__seed{args.seed}"
                                     f"__{time.strftime('%Y%m%d-%H%M%S')}")
            self.dir = os.path.join(args.out_dir, name)
            if os.path.exists(os.path.join(self.dir, "args.json")):
                raise UserError(f"run directory {self.dir} already exists; use --resume {self.dir} or another name")
            os.makedirs(self.dir, exist_ok=True)
            saved = {k: v for k, v in vars(args).items() if k not in ("resume", "stop_after")}
            self._write_json("args.json", {**saved, "provenance": provenance(main_script())})
        self.code = save_code(self.dir, [main_script(), __file__])
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.ckpt_path = os.path.join(self.dir, "checkpoint.pt")
        self.ckpt = None  # the checkpoint, once a resume has read it
        self.tb = self.wandb = None
        if getattr(args, "tensorboard", False):  # importable: parse_args checked it
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"))
        if getattr(args, "track", False):  # importable: parse_args checked it
            import wandb
            run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in os.path.basename(os.path.normpath(
                self.dir)))[-64:]  # one W&B run per run directory: a resume continues it
            self.wandb = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=os.path.basename(
                os.path.normpath(self.dir)), id=run_id, resume="allow", dir=self.dir, config=vars(args))
            for name in self.code:
                self.wandb.save(os.path.join(self.dir, "code", name), base_path=self.dir, policy="now")

    def _write_json(self, name, obj):
        path = os.path.join(self.dir, name)
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(path + ".tmp", path)

    def log(self, record):
        """Append one metrics record (a flat dict) to metrics.jsonl."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("epoch", "iteration") and isinstance(v, (int, float))}
        if self.tb:  # the same metrics; x axis: training iterations
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["iteration"] or record["epoch"])
            self.tb.flush()
        if self.wandb:
            self.wandb.log({**scalars, "epoch": record["epoch"]}, step=record["iteration"] or record["epoch"])

    def save_checkpoint(self, state):
        """Write checkpoint.pt atomically (temp file + rename): a kill never leaves a half-written file."""
        torch.save(state, self.ckpt_path + ".tmp")
        os.replace(self.ckpt_path + ".tmp", self.ckpt_path)

    def load_checkpoint(self):
        """The checkpoint, with metrics.jsonl trimmed to the epochs it covers (a line written after it, or cut
        short by a kill, is dropped)."""
        state = load_weights_only(self.ckpt_path, "checkpoint")
        keep_up_to, shift = state.get("epochs_done"), 0  # metrics rows are numbered like it
        if keep_up_to is None:  # a checkpoint written before epochs were counted from 1: its rows count from 0
            keep_up_to, shift = state["epoch"], 1
            state["epochs_done"] = state["epoch"] + 1
        if os.path.isfile(self.metrics_path):
            rows = []
            with open(self.metrics_path) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
            with open(self.metrics_path, "w") as f:
                for r in rows:
                    if r["epoch"] <= keep_up_to:
                        f.write(json.dumps({**r, "epoch": r["epoch"] + shift}) + "\n")
        return state

    def save_model(self, model, extra):
        """model.pt: the quantized student's state_dict (float weights + quantizer state) and how to rebuild it (the
        script's name and the run's args: load_quantized calls that script's build_student)."""
        torch.save({"state_dict": model.state_dict(), **extra}, os.path.join(self.dir, "model.pt"))

    def summary(self, obj):
        self._write_json("summary.json", {**obj, "version": __version__, "provenance": provenance(main_script()),
                                          "code_sha256": self.code})
        if self.wandb:
            self.wandb.summary.update({k: v for k, v in obj.items() if isinstance(v, (int, float))})
            self.wandb.finish()
            self.wandb = None


def main_script():
    """The path of the script this program runs (its __main__ module)."""
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None) or sys.argv[0]


def import_script(name, folder=None):
    """Import a method script (name.py, from `folder` or next to this file) as a module, without running its main."""
    for d in [folder, os.path.dirname(os.path.abspath(__file__)), os.getcwd()]:
        path = os.path.join(d, f"{name}.py") if d else None
        if path and os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(f"cleanqd_script_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise UserError(f"{name}.py, the script that trained this student, is not next to common.py nor in the current "
                    "folder; it is needed to rebuild the student")


def load_quantized(path, device="cpu"):
    """Rebuild a student saved with --save-model: returns (model in eval mode with frozen quantizers, mean, std).
    The file is read with weights_only=True (no code runs); the student is built by the script that trained it
    (its build_student(args, teacher_shaped_model)), then its saved state is loaded."""
    blob = load_weights_only(path, "saved student (model.pt)")
    template = imagenet_model(blob["arch"], blob["num_classes"]) if blob.get("arch") else \
        CifarResNet(blob["depth"], blob["num_classes"])
    if "script" in blob:
        module = import_script(blob["script"], blob.get("script_dir"))
        args = argparse.Namespace(**{**blob["args"], "device": str(device)})
        model = module.build_student(args, template)
    else:  # model.pt written before the script was recorded: the generator methods' ZeroQ student
        model = quantize_model(template, blob["wbits"], blob["abits"])
    return _load_student_state(model, blob["state_dict"], device), tuple(blob["mean"]), tuple(blob["std"])


def load_run_student(run_dir, device="cpu"):
    """The student of a run directory: its model.pt (--save-model), else its last checkpoint.pt rebuilt through the
    script named in args.json (the evaluation normalisation then comes from the run's teacher, which must be at
    hand). Returns (model, mean, std) as load_quantized does."""
    if os.path.isfile(os.path.join(run_dir, "model.pt")):
        return load_quantized(os.path.join(run_dir, "model.pt"), device)
    ckpt, args_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "args.json")
    if not (os.path.isfile(ckpt) and os.path.isfile(args_path)):
        raise UserError(f"{run_dir} holds neither model.pt nor checkpoint.pt + args.json: is it a run directory?")
    with open(args_path) as f:
        args = argparse.Namespace(**{**json.load(f), "device": str(device)})
    _, info = load_teacher(args.teacher, args.dataset, args.teacher_depth, arch=getattr(args, "arch", None))
    state = load_weights_only(ckpt, "checkpoint")["student"]
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}  # the student's depth, from its own weights
    template = build_model(args.dataset, getattr(args, "arch", None), 6 * len(blocks) + 2)
    model = import_script(args.method).build_student(args, template)
    mean, std = eval_normalisation(args, info)
    return _load_student_state(model, state, device), mean, std


def _load_student_state(model, state, device):
    if not any(k.endswith(".beta_t") for k in model.state_dict()):  # --act-ema reference's counter: calibration only
        state = {k: v for k, v in state.items() if not k.endswith(".beta_t")}
    model.load_state_dict(state)
    set_calibrating(model, False)
    return model.to(device).eval()


def fmt_time(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def setup(args, evaluate_only=False):
    """Seed, load the teacher (frozen, channels_last) and the test set, create or reopen the run directory and
    evaluate the teacher (a resumed run reads the figure from its checkpoint). evaluate_only (a script's `--epochs 0`)
    ends here with a summary. Returns (teacher, info, test, run, teacher_top1)."""
    seed_everything(args.seed, args.deterministic)
    if torch.device(args.device).type == "cpu":
        keep_freed_memory()  # large activations reused, not page-faulted in again at every iteration
    teacher, info = load_teacher(args.teacher, args.dataset, args.teacher_depth, arch=getattr(args, "arch", None))
    teacher = teacher.to(args.device, memory_format=torch.channels_last).requires_grad_(False)
    test = (ImageNetEval if args.dataset == "imagenet" else EvalData)(args, info)
    print(f"teacher: {info['layout']} {info.get('arch') or f'ResNet-{args.teacher_depth}'} from {info['path']}")
    print(f"evaluation normalisation ({args.eval_norm}): mean {test.mean} std {test.std}")
    run = Run(args)
    with open(info["path"], "rb") as f:
        run.teacher_sha256 = hashlib.sha256(f.read()).hexdigest()
    _INTERRUPT["where"] = lambda: (f"before training resumed; continue with: python {script_name()} --resume {run.dir}"
                                   if args.resume else f"before the first epoch ended: nothing to resume; remove "
                                                       f"{run.dir} and start again")
    if args.resume:
        run.ckpt = run.load_checkpoint()
    if run.ckpt is not None and run.ckpt.get("teacher_top1") is not None:
        teacher_top1 = run.ckpt["teacher_top1"]
    else:
        teacher_top1 = test.top1(teacher)
    print(f"teacher top-1 {teacher_top1:.2f}  run dir {run.dir}", flush=True)
    if evaluate_only:
        run.summary({"teacher_top1": teacher_top1, "final_top1": None, "best_top1": None, "epochs_done": 0,
                     "wall_seconds": 0.0, "run_dir": run.dir, "args": vars(args)})
        raise SystemExit(0)
    return teacher, info, test, run, teacher_top1


def full_precision(x):
    """x in float32 if it is a bf16/fp16 tensor (from --amp bf16), else x itself (float32 or float64 unchanged)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class _BatchStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):
        xc = x - c.view(1, -1, 1, 1)
        d = xc.mean((0, 2, 3))
        var = xc.mul_(xc).mean((0, 2, 3)) - d * d
        ctx.save_for_backward(x, c, d)
        return d + c, var

    @staticmethod
    def backward(ctx, g_mean, g_var):  # d/dx: g_mean / n + g_var * 2 (x - mean) / n, one pass over x
        x, c, d = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        a = g_var * (2 / n)
        b = (g_mean - 2 * d * g_var) / n - a * c
        return torch.addcmul(b.view(1, -1, 1, 1), x, a.view(1, -1, 1, 1)), None


def batch_stats(x, center):
    """Per-channel batch mean and biased variance of x [B, C, H, W], the variance as E[(x-c)²] - (E[x]-c)² around
    `center` (a BN's running mean: stable in float32). Values as that expression computes them step by step; the
    gradient in one pass over x (autograd's graph of the expression takes about eight), equal to float rounding."""
    return _BatchStats.apply(x, center.detach())


def _to_float(out):
    """float32 copies of the floating-point tensors in a model's output (a tensor, or a dict / list / tuple of them)."""
    if isinstance(out, torch.Tensor):
        return full_precision(out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(v) for v in out)
    return out


def _compile_available(device):
    """None if torch.compile works here (tried on a tiny function), else why not, in one line."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4, device=device))
        return None
    except Exception as e:  # no C++ compiler, an unsupported Python, ...
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def accelerate(args, *models, eager=()):
    """--amp bf16 and --compile, applied in place to the script's models once they are all built (a copy made
    afterwards, such as a student from the teacher, would share the wrapped forward). Parameters, buffers, state_dict
    keys and checkpoints are unchanged, so a run resumes with or without --compile.
    --amp bf16: each model's forward runs under bf16 autocast (convolutions and matmuls in bf16) and returns float32;
    QuantReLU and the scripts' BN-statistics hooks cast their inputs to float32, so quantizers, statistics and losses
    stay float32. --compile: nn.Module.compile() (torch.compile of each model's forward: the generator, teacher and
    student steps and the evaluation forward), except the models in `eager`: a compiled forward is one node of the
    autograd graph, so a gradient with respect to an activation that a hook took inside it (Grad-CAM's) cannot be
    taken; such a script names those models here. Where torch.compile does not work, one line says why and the run
    continues in eager mode (args.compile is then False in summary.json). The compiling itself happens in the first
    iterations: Progress prints the first one's time on its own line."""
    device_type = torch.device(args.device).type
    if getattr(args, "amp", "off") == "bf16":
        for m in models:
            m.forward = _bf16_forward(m.forward, device_type)
    if getattr(args, "compile", False):
        why = _compile_available(args.device)
        if why:
            print(f"warning: --compile is unavailable here ({why}); running eager, results are the same")
            args.compile = False
            return
        # a compiled backward may donate (reuse) its saved buffers, which fails on a second backward through the same
        # graph (autograd.grad(..., retain_graph=True), then backward): keep them
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        for m in models:
            if not any(m is e for e in eager):
                m.compile()


def _bf16_forward(forward, device_type):
    def bf16_forward(*a, **kw):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = forward(*a, **kw)
        return _to_float(out)
    return bf16_forward


def keep_freed_memory(on=True):
    """CPU speed, numerics untouched: glibc's malloc maps every block above its mmap threshold (at most 32 MB) afresh
    and unmaps it on free, so a large activation (a 200 x 64 x 32² tensor is 52 MB; LRQ's attention maps more) is
    page-faulted in again at every iteration. on=True: serve every block from the heap and keep freed memory for
    reuse (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB: what jemalloc or tcmalloc by LD_PRELOAD also give); on=False: glibc's
    defaults back. Returns whether it took effect (False where the C library is not glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    ok = mallopt(m_mmap_max, 0 if on else 65536) == 1
    ok = mallopt(m_trim_threshold, 2 ** 31 - 1 if on else 128 * 1024) == 1 and ok
    if not on and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return ok


def cpu_model():
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows: for summaries and benchmarks."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class Progress:
    """The bookkeeping every training loop shares: resume from the checkpoint, the progress of an epoch
    (`iterate`), then per epoch the NaN check, test-set evaluation, metrics line, atomic checkpoint, console line
    (with ETA) and --stop-after; at the end the summary and --save-model. `state` maps checkpoint keys to objects
    with state_dict()/load_state_dict(). Epochs are counted from 1 in the console, metrics.jsonl and checkpoint."""

    def __init__(self, args, run, test, teacher_top1, state):
        self.args, self.run, self.test, self.teacher_top1, self.state = args, run, test, teacher_top1, state
        self.start_epoch, self.best, self.top1, self.calib_top1, elapsed = 0, 0.0, None, None, 0.0
        if args.resume:
            ckpt = run.ckpt
            for k, obj in state.items():
                try:
                    obj.load_state_dict(ckpt[k])
                except (KeyError, ValueError, RuntimeError) as e:  # e.g. a checkpoint of an older version
                    raise UserError(f"--resume {run.dir}: its checkpoint's {k} does not match this version of "
                                    f"{script_name()} ({type(e).__name__}); start a new run") from e
            set_rng_state(ckpt["rng"])
            self.start_epoch, self.best, self.top1 = ckpt["epochs_done"], ckpt["best_top1"], ckpt["top1"]
            self.calib_top1, elapsed = ckpt["calib_top1"], ckpt["elapsed"]
            print(f"resumed {run.dir} after epoch {self.start_epoch}")
        self.t_start, self.t_session = time.time() - elapsed, time.time()
        self.epochs_saved, self.epoch_now, self.first_eta_shown = self.start_epoch, None, False
        self.sums, self.counts, self.notes, self.iters_per_epoch, self.train_time = {}, {}, {}, 0, 0.0
        self.images, self.images_time = 0, 0.0  # this session's, for the cost in summary.json
        _INTERRUPT["where"] = self._where

    def _where(self):
        a, d = self.args, self.run.dir
        now = f"in epoch {self.epoch_now + 1}/{a.epochs}" if self.epoch_now is not None else "before the first epoch"
        if self.epochs_saved == 0:
            return f"{now}, before the first checkpoint: nothing to resume; remove {d} and start again"
        return (f"{now}; the checkpoint after epoch {self.epochs_saved} is in {self.run.ckpt_path}; continue with: "
                f"python {script_name()} --resume {d}")

    def iterate(self, epoch, iterable, total):
        """Yield the items of one epoch's `total` iterations. After the first few iterations this process runs, one
        line with the speed and a first ETA; on a terminal, a single line that updates within the epoch. Nothing
        here waits for the device per iteration (one synchronisation for the first ETA, on a GPU)."""
        a, tty = self.args, sys.stdout.isatty()
        self.epoch_now, self.iters_per_epoch = epoch, total
        t0 = t_shown = time.time()
        t1 = None
        for i, item in enumerate(iterable):
            yield item
            if i == 0:
                t1 = time.time()  # the first iteration pays one-off set-up costs: time from its end
                if getattr(a, "compile", False) and not self.first_eta_shown:
                    print(f"first iteration {t1 - t0:.1f} s, torch.compile included (a recompile, e.g. when the "
                          f"warm-up ends or for evaluation, is in its epoch's time)", flush=True)
            elif i == 3 and not self.first_eta_shown:
                if str(a.device).startswith("cuda"):
                    torch.cuda.synchronize()
                per_it = (time.time() - t1) / 3
                left = (total - i - 1) * per_it + total * per_it * (a.epochs - epoch - 1)
                print(f"{per_it:.3g} s/iteration over iterations 2-4: about {fmt_time(total * per_it)} an epoch "
                      f"of {total}, ETA of the run {fmt_time(left)} (this epoch and {a.epochs - epoch - 1} more)",
                      flush=True)
                self.first_eta_shown = True
            if tty and time.time() - t_shown > 0.5:
                t_shown = time.time()
                rate = (i + 1) / (t_shown - t0)
                print(f"\r  epoch {epoch + 1}/{a.epochs}: iteration {i + 1}/{total} "
                      f"({fmt_time((total - i - 1) / rate)} left in the epoch)", end="\033[K", flush=True)
        self.train_time = time.time() - t0
        if tty:
            print("\r\033[K", end="", flush=True)

    def add(self, name, value):
        """Log a quantity where it is computed, once per iteration: end_epoch logs its mean over the epoch (in
        metrics.jsonl and on the console). A tensor is summed on its device (no host synchronisation); a number
        is summed on the host."""
        v = value.detach() if isinstance(value, torch.Tensor) else float(value)
        self.sums[name] = self.sums[name] + v if name in self.sums else v
        self.counts[name] = self.counts.get(name, 0) + 1

    def note(self, name, value):
        """Log an epoch-level number (not a mean over iterations), e.g. a count, in metrics.jsonl and on the console."""
        self.notes[name] = value

    def _means(self):
        names = list(self.sums)
        tensors = [k for k in names if isinstance(self.sums[k], torch.Tensor)]
        out = dict(zip(tensors, torch.stack([self.sums[k].float() for k in tensors]).tolist())) if tensors else {}
        out.update({k: self.sums[k] for k in names if k not in out})
        means = {k: out[k] / self.counts[k] for k in names}
        self.sums, self.counts = {}, {}
        return means

    def end_epoch(self, epoch, student, charts, images, warmup=False, calibration_done=False):
        """Call once per epoch (`epoch` counts from 0 in the loop), after the `iterate` loop. Logs the means of what
        was `add`ed and the `note`d values (console and metrics.jsonl) and `charts` (name -> value, e.g. the lrs;
        metrics.jsonl only, as charts/NAME); `images`: how many the epoch trained on, for the speed.
        calibration_done marks the epoch whose accuracy is the calibrated-only baseline (evaluated whatever
        --eval-every says)."""
        a = self.args
        losses, train_time = {**self._means(), **self.notes}, self.train_time
        self.notes = {}
        check_finite(losses, epoch)
        last = epoch == a.epochs - 1
        if (epoch + 1) % a.eval_every == 0 or last or calibration_done:
            self.top1 = self.test.top1(student)
            self.best = max(self.best, self.top1)
            if calibration_done:
                self.calib_top1 = self.top1
        elapsed = time.time() - self.t_start
        ips = images / max(train_time, 1e-9)
        self.images, self.images_time = self.images + images, self.images_time + train_time
        eta = (time.time() - self.t_session) / (epoch + 1 - self.start_epoch) * (a.epochs - epoch - 1)
        _INTERRUPT["defer"] = True  # a signal now waits until the epoch's metrics and checkpoint are written
        self.run.log({"epoch": epoch + 1, "iteration": (epoch + 1) * self.iters_per_epoch, **losses,
                      "eval/top1": self.top1, "eval/best_top1": self.best,
                      **{f"charts/{k}": v for k, v in charts.items()},
                      "charts/images_per_s": ips, "charts/elapsed_s": elapsed})
        self.run.save_checkpoint({"epochs_done": epoch + 1, "best_top1": self.best, "top1": self.top1,
                                  "elapsed": elapsed, "calib_top1": self.calib_top1, "teacher_top1": self.teacher_top1,
                                  "rng": rng_state(), **{k: obj.state_dict() for k, obj in self.state.items()}})
        self.epochs_saved = epoch + 1
        loss_txt = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in losses.items())
        top1 = f"{self.top1:.2f}" if self.top1 is not None else "-"
        print(f"epoch {epoch + 1}/{a.epochs}{' (warm-up)' if warmup else ''} | {loss_txt} | top-1 {top1} "
              f"(best {self.best:.2f}) | {ips:.0f} img/s | ETA {fmt_time(eta)}", flush=True)
        _INTERRUPT["defer"] = False
        if _INTERRUPT["pending"] is not None:
            raise Interrupted(_INTERRUPT["pending"])
        if a.stop_after is not None and epoch + 1 >= a.stop_after and not last:
            print(f"stopped after epoch {epoch + 1}; continue with: python {script_name()} --resume {self.run.dir}")
            raise SystemExit(0)

    def finish(self, student, depth, num_classes, protocol=None, extra=None):
        """Write summary.json (and model.pt with --save-model, which load_quantized rebuilds through the script's
        build_student(args, model of this depth and class count)). `protocol`: what makes this run's cell comparable,
        as the script describes it (quantizer, activation ranges, training data, iterations, batch, teacher passes);
        the teacher's file hash and top-1, the bits and the test split are added here, and the cost beside it."""
        a = self.args
        _INTERRUPT["where"] = None
        if a.save_model:
            script = main_script()
            self.run.save_model(student, {"script": method_name(script), "script_dir": os.path.dirname(
                os.path.abspath(script)), "args": {k: v for k, v in vars(a).items() if k != "provenance"},
                "depth": depth, "arch": getattr(a, "arch", None), "num_classes": num_classes, "wbits": a.wbits,
                "abits": a.abits,
                "mean": list(self.test.mean), "std": list(self.test.std)})
        wall = time.time() - self.t_start
        split = "val" if a.dataset == "imagenet" else "test"
        protocol = {**(protocol or {}), "dataset": a.dataset, "test_split": f"{a.dataset} {split}, {len(self.test.y)} "
                    f"images", "wbits": a.wbits, "abits": a.abits, "teacher_sha256": self.run.teacher_sha256,
                    "teacher_top1": self.teacher_top1, "eval_norm": a.eval_norm,
                    **({"precision": "bf16 autocast"} if getattr(a, "amp", "off") == "bf16" else {})}
        device = torch.cuda.get_device_name(torch.device(a.device)) if str(a.device).startswith("cuda") else \
            f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()} ({torch.get_num_threads()} threads)"
        cost = {"wall_seconds": wall, "device": device, "images_per_s": self.images / max(self.images_time, 1e-9)}
        self.run.summary({"teacher_top1": self.teacher_top1, "calibrated_top1": self.calib_top1,
                          "final_top1": self.top1, "best_top1": self.best, "epochs_done": a.epochs,
                          "wall_seconds": wall, "run_dir": self.run.dir, "protocol": protocol, "cost": cost,
                          "args": vars(a), **(extra or {})})
        print(f"done: final top-1 {self.top1:.2f}, best {self.best:.2f}, teacher {self.teacher_top1:.2f}, "
              f"wall {fmt_time(wall)}; summary in {os.path.join(self.run.dir, 'summary.json')}")


def lr_milestones(epochs, warmup_epochs, fractions, frm):
    """Epochs from which the learning rates are x0.1 (the family's step schedule): `fractions` of all epochs
    (frm 'all': exactly 100/200/300 of 400, as the reference's `epoch + 1 > milestone`) or of the post-warm-up epochs,
    offset by the warm-up (frm 'train', for short runs). Warns if the student would never train at its base lr."""
    start, span = (0, epochs) if frm == "all" else (warmup_epochs, epochs - warmup_epochs)
    milestones = [start + round(f * span) for f in fractions]
    if epochs > warmup_epochs and milestones and min(milestones) <= warmup_epochs:
        advice = " (use --milestones-from train for short runs)" if frm == "all" else \
            " (too few student epochs for these --milestones)"
        print(f"warning: the lr first decays in epoch {min(milestones) + 1}, not after the warm-up: the student "
              f"never trains at its base lr{advice}")
    return milestones


def check_warmup(epochs, warmup_epochs, calib_epochs=None):
    """The generator methods' activation ranges calibrate during the warm-up only (its first `calib_epochs`, if given):
    refuse a schedule under which the student would train on uncalibrated ranges, and say so when it would never
    train."""
    if epochs == 0:
        return  # evaluate the teacher only
    if warmup_epochs < 1:
        die(f"--warmup-epochs {warmup_epochs}: the activation ranges calibrate during the warm-up only, so with none "
            "the student trains on uncalibrated ranges (chance level); use at least 1")
    if warmup_epochs > epochs:
        die(f"--warmup-epochs {warmup_epochs} is more than --epochs {epochs}: the warm-up would not end and the "
            f"student would never train; use --epochs above {warmup_epochs}")
    if warmup_epochs == epochs:
        print(f"warning: --epochs {epochs} equals --warmup-epochs: the student never trains; this run measures the "
              "calibrated-only baseline")
    if calib_epochs is not None and not 1 <= calib_epochs <= warmup_epochs:
        die(f"--calib-epochs {calib_epochs}: the activation ranges calibrate in the first epochs of the warm-up "
            f"(--warmup-epochs {warmup_epochs}); use 1 to {warmup_epochs}")


def set_lr(opt, lr, key="lr"):
    """Set `key` (the lr by default) of every param group of opt."""
    for group in opt.param_groups:
        group[key] = lr


def check_finite(losses, epoch):
    """Stop the run (exit 1, one line) if any epoch-mean loss is NaN/Inf; the last checkpoint is kept. `epoch` is
    0-based; the message counts from 1, like the console lines."""
    for name, v in losses.items():
        if not np.isfinite(v):
            die(f"{name} became {v} in epoch {epoch + 1}; run stopped, the checkpoint of the last good epoch is kept",
                code=1)
