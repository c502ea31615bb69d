"""Fixtures: a tiny CIFAR dataset in the official python layout and random teachers in both weight layouts,
all written by the tests into temp dirs (nothing is downloaded)."""
import functools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import CifarResNet  # noqa: E402


def write_tiny_cifar(root, n_train=40, n_test=30, seed=0):
    """CIFAR-10 (5 train batches + test batch) and CIFAR-100 (train/test) pickles, official key names."""
    rng = np.random.default_rng(seed)
    c10 = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(c10)
    for i in range(1, 6):
        with open(os.path.join(c10, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5",
                         "labels": rng.integers(0, 10, n_train // 5).tolist(),
                         "data": rng.integers(0, 256, (n_train // 5, 3072), dtype=np.uint8),
                         "filenames": [f"img{i}_{j}.png" for j in range(n_train // 5)]}, f)
    with open(os.path.join(c10, "test_batch"), "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": rng.integers(0, 10, n_test).tolist(),
                     "data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)}, f)
    with open(os.path.join(c10, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)], "num_cases_per_batch": n_train // 5}, f)
    c100 = os.path.join(root, "cifar-100-python")
    os.makedirs(c100)
    for name, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(c100, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, n).tolist(),
                         "coarse_labels": rng.integers(0, 20, n).tolist(),
                         "filenames": [f"x{j}.png" for j in range(n)], "batch_label": name}, f)
    with open(os.path.join(c100, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)],
                     "coarse_label_names": [str(i) for i in range(20)]}, f)
    return root


def random_teacher(num_classes, seed=0, depth=20):
    """A ResNet with random weights and non-trivial BN running statistics."""
    torch.manual_seed(seed)
    m = CifarResNet(depth, num_classes)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.1, 0.1)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_tiny_cifar(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """Paths of random teachers saved as plain state_dicts (chenyaofo/torchvision key names)."""
    d = tmp_path_factory.mktemp("teachers")
    paths = {}
    for ds, c in (("cifar10", 10), ("cifar100", 100)):
        paths[ds] = str(d / f"{ds}_random.pth")
        torch.save(random_teacher(c, seed=c).state_dict(), paths[ds])
    return paths


def metrics(run_dir):
    """A run directory's metrics.jsonl as a list of dicts."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(args, cwd, timeout=600):
    """Run a cleanqd script as a subprocess (offline), return CompletedProcess."""
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# Parity with the reference implementations: tests/fixtures/<method>/ holds outputs of each method's reference code
# on fixed inputs (see the README in each folder). They are part of the repository: a missing file fails the test.
# Many parity tests also need the pretrained teacher the fixtures were computed with, chenyaofo's CIFAR-10 ResNet-20
# (weights are not committed). It is looked up in CLEANQD_TEST_TEACHERS (a folder holding
# cifar10_resnet20_chenyaofo.pth), else taken from the download cache or downloaded as `--teacher chenyaofo` does.
# Without it those tests skip, and the run's last lines say so; CLEANQD_REQUIRE_PARITY=1 turns the skip into a failure.
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TEACHER_HELP = ("set CLEANQD_TEST_TEACHERS to a folder holding cifar10_resnet20_chenyaofo.pth (and, for CIFAR-100, "
                "cifar100_resnet20_chenyaofo.pth): chenyaofo's ResNet-20 state_dicts; or run once with network access, "
                "which downloads them")


def teacher_path(dataset):
    """The chenyaofo ResNet-20 teacher for `dataset` as a file path, or None (with the reason) when unavailable."""
    folder = os.environ.get("CLEANQD_TEST_TEACHERS")
    if folder:
        path = os.path.join(folder, f"{dataset}_resnet20_chenyaofo.pth")
        return (path, None) if os.path.isfile(path) else (None, f"{path} not found")
    return _downloaded_teacher(dataset)


@functools.cache
def _downloaded_teacher(dataset):
    from common import TEACHERS, UserError, _download
    try:
        cache = os.path.join(os.path.expanduser("~"), ".cache", "cleanqd")
        return _download(*TEACHERS[("chenyaofo", dataset)], cache), None
    except UserError:
        return None, f"chenyaofo's {dataset} ResNet-20 is not in the download cache and could not be downloaded"


def skip_or_fail(reason):
    if os.environ.get("CLEANQD_REQUIRE_PARITY") == "1":
        pytest.fail(f"{reason} (CLEANQD_REQUIRE_PARITY=1)")
    pytest.skip(reason)


def assert_teacher_acc_gen(rows, images_per_epoch):
    """charts/teacher_acc_gen (the teacher's top-1 on an epoch's generated images) is logged every epoch and is a
    count of correct images over images_per_epoch, in percent."""
    for row in rows:
        acc, step = row["charts/teacher_acc_gen"], 100 / images_per_epoch
        assert 0 <= acc <= 100 and abs(acc / step - round(acc / step)) < 1e-3, (acc, images_per_epoch)


@pytest.fixture
def float64():
    """float64 as the default dtype for one test (tensors the code under test creates itself, e.g. random images)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def fixture(method, name):
    """A reference-output file of tests/fixtures/<method>/ as a dict (a missing file is an error, not a skip)."""
    path = os.path.join(FIXTURES, method, name)
    if not os.path.isfile(path):
        pytest.fail(f"parity fixture {path} is missing from this checkout (it is part of the repository)")
    return torch.load(path, weights_only=True)


def assert_close(ours, ref, tol, what=""):
    """The fixtures' bound: max|ours - ref| <= tol * max|ref| and ||ours - ref|| <= tol * ||ref||."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    scale = ref.abs().max().clamp(min=1e-30)
    assert diff.max() <= tol * scale, f"{what}: max-abs error {diff.max():.3g} > {tol} x {scale:.3g}"
    assert diff.norm() <= tol * ref.norm().clamp(min=1e-30), f"{what}: relative L2 error {diff.norm() / ref.norm():.3g}"


def parity_teacher():
    """The CIFAR-10 teacher the fixtures were computed with (skips, with the way to get it, when unavailable)."""
    from common import load_teacher
    path, why = teacher_path("cifar10")
    if path is None:
        skip_or_fail(f"parity test needs the pretrained teacher: {why}; {TEACHER_HELP}")
    return load_teacher(path, "cifar10")[0].to(memory_format=torch.channels_last).requires_grad_(False)


def frozen_student(teacher, act_lo, act_hi, wbits=4, abits=4):
    """W/A quantized copy of the teacher in eval mode whose 19 activation ranges are set (not calibrated)."""
    from common import QuantReLU, quantize_model, set_calibrating
    student = quantize_model(teacher, wbits, abits).requires_grad_(True).eval()
    set_calibrating(student, False)
    relus = [m for m in student.modules() if isinstance(m, QuantReLU)]
    assert len(relus) == len(act_lo) == 19
    for m, lo, hi in zip(relus, act_lo, act_hi):
        m.lo.fill_(float(lo))
        m.hi.fill_(float(hi))
        m.initialised.fill_(True)
    return student


def names(s):
    """A fixture's list of names (stored comma-joined)."""
    return s.split(",") if isinstance(s, str) else list(s)


def check_student_step(student, ref, grad_tol):
    """After a backward: every parameter's gradient against the fixture (norms, and full tensors where stored), then
    the reference's Nesterov SGD step (lr 1e-4, momentum 0.9, weight decay 1e-4) and the parameters after it."""
    params = dict(student.named_parameters())
    assert list(params) == names(ref["param_names"])
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        assert_close(p.grad.norm(), ref[f"grad_norm/{n}"], grad_tol, f"grad norm {n}")
        if f"grad/{n}" in ref:
            assert_close(p.grad, ref[f"grad/{n}"], grad_tol, f"grad {n}")
    torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4).step()
    for n, p in params.items():
        assert_close((p.detach() - before[n]).norm(), ref[f"delta_norm/{n}"], grad_tol, f"update norm {n}")
        if f"after/{n}" in ref:
            assert_close(p.detach(), ref[f"after/{n}"], 1e-6, f"after {n}")


# ----------------------------------------------------------------------------------------------------------
# The end of every run: skipped tests grouped by reason, so that an unchecked parity claim cannot go unnoticed.
def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    groups = {}
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        groups.setdefault(reason, []).append(rep.nodeid)
    terminalreporter.section("skipped, by reason")
    for reason, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        terminalreporter.write_line(f"{len(ids):4d} skipped: {reason}")
    parity = sum(1 for rep in skipped if "test_parity_" in rep.nodeid)
    if parity:
        terminalreporter.write_line(f"PARITY NOT CHECKED: {parity} parity tests were skipped (reasons above)", red=True,
                                    bold=True)
