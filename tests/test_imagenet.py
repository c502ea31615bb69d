"""--dataset imagenet end to end on a tiny generated ImageFolder (3 classes, 2 images each, mixed sizes) and a
random-weight torchvision ResNet-18 saved as the teacher: every zero-shot script runs, a stopped run resumes
exactly, the student exports, the recipe defaults apply, and bad input is one line."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT, metrics, run_script

import common

CLASSES = (0, 1, 500)  # class indices of the folders (a folder holding only some classes keeps the full set's labels)
TINY = ["--dataset", "imagenet", "--arch", "resnet18", "--wbits", "4", "--batch-size", "2", "--iters-per-epoch", "2",
        "--warmup-epochs", "1", "--epochs", "2", "--milestones-from", "train", "--workers", "0", "--threads", "2"]


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenet")
    wnids, rng = common.imagenet_wnids(), np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(root / "val" / wnids[c])
        for i, ext in enumerate(("JPEG", "png")):
            size = (int(rng.integers(64, 300)), int(rng.integers(64, 300)), 3)
            Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / "val" / wnids[c] / f"{i}.{ext}")
    torch.manual_seed(0)
    torch.save(common.imagenet_model("resnet18").state_dict(), root / "resnet18.pth")
    return root


def run(script, data, out, *extra):
    return run_script([script, *TINY, "--data-dir", str(data), "--teacher", str(data / "resnet18.pth"),
                       "--out-dir", str(out), *extra], cwd=ROOT)


def test_labels_follow_the_sorted_wnid_index(tiny_imagenet):
    files = common.imagenet_val_files(str(tiny_imagenet))
    assert len(files) == 6 and sorted({label for _, label in files}) == list(CLASSES)
    wnids = common.imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert all(os.path.basename(os.path.dirname(p)) == wnids[label] for p, label in files)


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("gdfq.py", ()), ("ait.py", ()), ("akt.py", ()), ("lrq.py", ()),
                                          ("synq.py", ("--num-images", "4", "--syn-batch", "2", "--syn-iters", "2"))])
def test_every_zero_shot_script_runs_on_imagenet(tiny_imagenet, tmp_path, script, extra):
    r = run(script, tiny_imagenet, tmp_path, "--run-name", "r", *extra)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["protocol"]["test_split"] == "imagenet val, 6 images" and s["args"]["arch"] == "resnet18"
    assert s["final_top1"] is not None and len(metrics(tmp_path / "r")) == 2
    assert "teacher: torchvision resnet18" in r.stdout
    # the recipe's defaults that these flags did not override are the ImageNet ones
    a = json.loads((tmp_path / "r" / "args.json").read_text())
    assert a["teacher"].endswith("resnet18.pth") and a["batch_size"] == 2
    if script in ("gdfq.py", "lrq.py"):
        assert a["lr_s"] == 1e-6 and a["calib_epochs"] == 1  # 4 in the recipe, bounded by the 1-epoch warm-up


@pytest.mark.slow
def test_imagenet_run_resumes_exactly_and_exports(tiny_imagenet, tmp_path):
    assert run("gdfq.py", tiny_imagenet, tmp_path, "--run-name", "full", "--save-model").returncode == 0
    r = run("gdfq.py", tiny_imagenet, tmp_path, "--run-name", "cut", "--stop-after", "1")
    assert r.returncode == 0 and not (tmp_path / "cut" / "summary.json").exists()
    r = run_script(["gdfq.py", "--resume", str(tmp_path / "cut"), "--workers", "1"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    keys = [k for k in a[0] if k.startswith(("losses/", "eval/", "charts/lr"))]
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    sa = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["student"]
    sb = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["student"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the saved student rebuilds as torchvision's resnet18, and exports
    model, mean, std = common.load_quantized(str(tmp_path / "full" / "model.pt"))
    assert model.arch == "resnet18" and mean == common.IMAGENET_NORM[0]
    r = run_script(["tools/export.py", str(tmp_path / "full")], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "full" / "student_int.npz").exists() and "rebuilt the resnet18 student" in r.stdout
    assert json.loads((tmp_path / "full" / "export.json").read_text())["arch"] == "resnet18"


def test_recipe_defaults_per_dataset_and_architecture(tmp_path):
    import akt
    import gdfq
    import synq
    a = gdfq.parse(["--dataset", "imagenet"])
    assert (a.batch_size, a.warmup_epochs, a.calib_epochs, a.lr_s, a.arch, a.teacher) == \
        (16, 50, 4, 1e-6, "resnet18", "torchvision")
    assert gdfq.parse(["--dataset", "imagenet", "--batch-size", "32"]).batch_size == 32  # a given flag wins
    c = gdfq.parse([])  # CIFAR: unchanged
    assert (c.batch_size, c.warmup_epochs, c.calib_epochs, c.lr_s, c.teacher) == (200, 4, 4, 1e-4, "pytorchcv")
    r50 = akt.parse(["--dataset", "imagenet", "--arch", "resnet50"])
    assert (r50.warmup_epochs, r50.lr_s, r50.milestones, r50.h_low, r50.temperature) == (100, 1e-4, [0.375, 0.75],
                                                                                            0.4, 5.0)
    assert akt.parse(["--dataset", "imagenet", "--arch", "mobilenet_v2"]).lr_s == 1e-5
    s = synq.parse(["--dataset", "imagenet"])
    assert (s.batch_size, s.epochs, s.syn_aug, s.fa_pert) == (16, 100, 0.5, 1)
    assert (synq.parse([]).syn_aug, synq.parse([]).fa_pert) == (0.0, 0)


def test_calibration_epochs_are_checked_and_bounded_by_the_warmup(capsys):
    import gdfq
    with pytest.raises(SystemExit) as e:
        gdfq.parse(["--calib-epochs", "0"])
    assert e.value.code == 2 and "--calib-epochs 0" in capsys.readouterr().err
    a = gdfq.parse(["--dataset", "imagenet", "--warmup-epochs", "2", "--epochs", "3"])
    assert a.calib_epochs == 2 and "calibrate in the 2 warm-up epochs" in capsys.readouterr().out


def test_help_shows_the_imagenet_recipe():
    r = run_script(["akt.py", "--help"], cwd=ROOT)
    assert r.returncode == 0 and "[imagenet: resnet18: 1e-05, resnet50: 0.0001, mobilenet_v2: 1e-05]" in \
        " ".join(r.stdout.split())


def test_relu6_places_get_quantizers():
    student = common.quantize_model(common.imagenet_model("mobilenet_v2"), 4, 4)
    q = [m for m in student.modules() if isinstance(m, common.QuantReLU)]
    assert len(q) == 35 and all(m.six for m in q)
    x = torch.linspace(-2, 9, 12).view(1, 1, 3, 4)
    assert q[0](x).max() <= 6.0 and q[0].hi == 6.0  # calibrated on relu6(x)


def test_residual_branches_of_every_architecture():
    n = {a: len(common.residual_branches(common.imagenet_model(a))) for a in common.IMAGENET_ARCHS}
    assert n == {"resnet18": 8, "resnet50": 16, "mobilenet_v2": 10}
    assert len(common.residual_branches(common.CifarResNet(20, 10))) == 9


@pytest.mark.parametrize("case", ["no_val", "unknown_wnid", "other_arch", "arch_on_cifar", "chenyaofo_on_imagenet",
                                  "faqd", "akt_base_gdfq"])
def test_bad_imagenet_input_is_one_line(tiny_imagenet, tmp_path, case):
    data, teacher, script, extra = tiny_imagenet, str(tiny_imagenet / "resnet18.pth"), "gdfq.py", []
    expect = {"no_val": "no ImageNet validation set", "unknown_wnid": "not ImageNet-1k class ids",
              "other_arch": "do not match torchvision resnet50", "arch_on_cifar": "--arch resnet18 applies to",
              "chenyaofo_on_imagenet": "has no imagenet weights", "faqd": "invalid choice: 'imagenet'",
              "akt_base_gdfq": "AdaDFQ's"}[case]
    if case == "no_val":
        data = tmp_path
    elif case == "unknown_wnid":
        import shutil
        shutil.copytree(tiny_imagenet / "val", tmp_path / "val")
        os.makedirs(tmp_path / "val" / "cats")
        data = tmp_path
    elif case == "other_arch":
        extra = ["--arch", "resnet50"]
    elif case == "chenyaofo_on_imagenet":
        teacher = "chenyaofo"
    elif case == "faqd":
        script = "faqd.py"
    elif case == "akt_base_gdfq":
        script, extra = "akt.py", ["--base", "gdfq"]
    args = [script, "--dataset", "imagenet", "--data-dir", str(data), "--teacher", teacher, "--workers", "0",
            "--out-dir", str(tmp_path / "runs"), "--epochs", "0", *extra]
    if case == "arch_on_cifar":
        args = ["gdfq.py", "--arch", "resnet18", "--epochs", "0"]
    r = run_script(args, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], r.stderr


@pytest.mark.slow
def test_run_all_runs_imagenet_cells_as_tasks_and_reports_them(tiny_imagenet, tmp_path):
    """run_all.sh --datasets imagenet: one cell per network, zero-shot methods only; a task (what a Slurm array task
    runs) runs one, and the report puts it in its own cell."""
    import shutil
    import subprocess
    tdir = tmp_path / "teachers"
    os.makedirs(tdir)
    shutil.copy(tiny_imagenet / "resnet18.pth", tdir / "imagenet_resnet18_random.pth")
    grid = ["--budget", "smoke", "--datasets", "imagenet", "--archs", "resnet18", "--methods", "gdfq faqd",
            "--seeds", "0", "--bits", "4", "--imagenet-dir", str(tiny_imagenet), "--teacher-dir", str(tdir),
            "--out-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res"), "--extra", "--workers 0"]
    env = {**os.environ, "CLEANQD_OFFLINE": "1"}
    listed = subprocess.run(["bash", "run_all.sh", *grid, "--list"], cwd=ROOT, capture_output=True, text=True, env=env)
    lines = listed.stdout.strip().splitlines()
    assert listed.returncode == 0 and len(lines) == 1 and "--dataset imagenet" in lines[0] and "--arch resnet18" in \
        lines[0] and "imagenet_resnet18_random.pth" in lines[0] and "faqd" not in lines[0]
    r = subprocess.run(["bash", "run_all.sh", *grid, "--task", "0"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "runs" / "smoke" / "imagenet-resnet18__gdfq__w4a4__seed0" / "summary.json").exists()
    r = subprocess.run(["bash", "run_all.sh", *grid, "--report-only"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "| imagenet resnet18 | W4A4 | smoke |" in (tmp_path / "res" / "RESULTS.md").read_text()
