"""gdfq.py end to end on a tiny dataset: outputs, resume, NaN stop, saved model, and bad-input exits."""
import json

import pytest
import torch
from conftest import ROOT, assert_teacher_acc_gen, metrics, run_script

import common
from common import EvalData, load_quantized, load_teacher

TINY = ["--epochs", "3", "--warmup-epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8",
        "--milestones-from", "train", "--device", "cpu"]


def gdfq(tiny_data, teachers, out, *extra, dataset="cifar10"):
    return run_script(["gdfq.py", "--dataset", dataset, "--data-dir", tiny_data, "--teacher", teachers[dataset],
                       "--out-dir", str(out), *TINY, *extra], cwd=ROOT)


@pytest.mark.slow
def test_smoke_end_to_end_and_saved_model(tiny_data, teachers, tmp_path):
    r = gdfq(tiny_data, teachers, tmp_path, "--run-name", "a", "--save-model", "--wbits", "4", "--abits", "6")
    assert r.returncode == 0, r.stderr
    d = tmp_path / "a"
    s = json.loads((d / "summary.json").read_text())
    for k in ("teacher_top1", "calibrated_top1", "final_top1", "best_top1", "epochs_done", "wall_seconds"):
        assert s[k] is not None, k
    assert s["epochs_done"] == 3 and s["args"]["abits"] == 6 and s["best_top1"] >= s["final_top1"]
    import hashlib
    with open(teachers["cifar10"], "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    p = s["protocol"]  # what makes the cell comparable, and what the run cost
    assert (p["iterations"], p["batch"], p["wbits"], p["abits"], p["teacher_sha256"]) == (6, 8, 4, 6, sha)
    assert p["train_data"] == "generated" and p["activation_ranges"] == "plain EMA"
    assert p["test_split"].endswith("30 images")
    assert s["cost"]["images_per_s"] > 0 and s["cost"]["wall_seconds"] == s["wall_seconds"]
    assert s["cost"]["device"].startswith(common.cpu_model() + ", ") and s["cost"]["device"].endswith(" threads)")
    rows = metrics(d)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # counted from 1, as on the console
    assert rows[-1]["eval/top1"] == s["final_top1"] and rows[0]["eval/top1"] == s["calibrated_top1"]
    assert rows[0]["losses/loss_G"] > 0 and "charts/images_per_s" in rows[0]
    assert_teacher_acc_gen(rows, 2 * 8)
    # lr: warm-up at base, then fractions of the 2 post-warm-up epochs: milestones at 1+round(.25*2)=1, 2, 3
    assert rows[0]["charts/lr_S"] == pytest.approx(1e-4) and rows[2]["charts/lr_S"] == pytest.approx(1e-6)
    assert "(warm-up)" in r.stdout and "ETA" in r.stdout and "img/s" in r.stdout
    assert json.loads((d / "args.json").read_text())["wbits"] == 4 and (d / "checkpoint.pt").exists()
    # the README's snippet: rebuild the student and reproduce the final accuracy
    model, mean, std = load_quantized(str(d / "model.pt"))
    _, info = load_teacher(teachers["cifar10"], "cifar10")
    args = type("A", (), {"dataset": "cifar10", "data_dir": tiny_data, "eval_norm": "teacher", "device": "cpu"})
    assert EvalData(args, info).top1(model) == pytest.approx(s["final_top1"])


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tiny_data, teachers, tmp_path):
    assert gdfq(tiny_data, teachers, tmp_path, "--run-name", "full").returncode == 0
    r = gdfq(tiny_data, teachers, tmp_path, "--run-name", "cut", "--stop-after", "2")
    assert r.returncode == 0 and "--resume" in r.stdout and not (tmp_path / "cut" / "summary.json").exists()
    # a run started before a flag existed resumes with that flag's default (here --ce-weight 1)
    saved = json.loads((tmp_path / "cut" / "args.json").read_text())
    del saved["ce_weight"]
    (tmp_path / "cut" / "args.json").write_text(json.dumps(saved))
    r = run_script(["gdfq.py", "--resume", str(tmp_path / "cut")], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    keys = [k for k in a[0] if k.startswith(("losses/", "eval/", "charts/lr"))]
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert (sa["final_top1"], sa["best_top1"]) == (sb["final_top1"], sb["best_top1"])
    sa_model = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["student"]
    sb_model = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["student"]
    assert all(torch.equal(sa_model[k], sb_model[k]) for k in sa_model)


@pytest.mark.slow
def test_act_ema_reference_reaches_the_student_and_its_saved_model(tiny_data, teachers, tmp_path):
    """--act-ema reference: the ranges inflate as the reference's (2 updates in the 1-epoch warm-up: x5.3 of a
    steady batch), the counter is checkpointed, and the saved model still loads."""
    for ema in ("plain", "reference"):
        r = gdfq(tiny_data, teachers, tmp_path, "--run-name", ema, "--act-ema", ema, "--save-model")
        assert r.returncode == 0, r.stderr
    plain, ref = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["student"]
                  for n in ("plain", "reference"))
    his = [k for k in plain if k.endswith(".hi")]
    assert len(his) == 19 and not any(k.endswith("beta_t") for k in plain)
    assert all(ref[k[:-2] + "beta_t"] == pytest.approx(0.81) for k in his)  # 0.9^2 after two updates
    assert min(ref[k] / plain[k] for k in his) > 2
    s = json.loads((tmp_path / "reference" / "summary.json").read_text())
    model, _, _ = load_quantized(str(tmp_path / "reference" / "model.pt"))
    _, info = load_teacher(teachers["cifar10"], "cifar10")
    args = type("A", (), {"dataset": "cifar10", "data_dir": tiny_data, "eval_norm": "teacher", "device": "cpu"})
    assert EvalData(args, info).top1(model) == pytest.approx(s["final_top1"])


@pytest.mark.slow
def test_nan_stops_cleanly_and_keeps_last_checkpoint(tiny_data, teachers, tmp_path):
    r = gdfq(tiny_data, teachers, tmp_path, "--run-name", "nan", "--lr-s", "1e38")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # epoch 2 of 3 (the first training epoch; console numbering), after warm-up epoch 1 was checkpointed
    assert "became nan in epoch 2" in r.stderr or "became inf in epoch 2" in r.stderr, r.stderr
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["epochs_done"] == 1 and not (tmp_path / "nan" / "summary.json").exists()


@pytest.mark.slow
def test_epochs_zero_evaluates_teacher_only(tiny_data, teachers, tmp_path):
    r = run_script(["gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar100"], "--dataset", "cifar100",
                    "--epochs", "0", "--out-dir", str(tmp_path), "--run-name", "t"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert 0 <= s["teacher_top1"] <= 100 and s["final_top1"] is None and s["epochs_done"] == 0
    assert "normalisation" in r.stdout and "(0.507, 0.4865, 0.4409)" in r.stdout


BAD = {
    "wbits_low": (["--wbits", "1"], "--wbits 1 is out of range"),
    "wbits_high": (["--wbits", "9"], "--wbits 9 is out of range"),
    "abits_low": (["--abits", "1"], "--abits 1 is out of range"),
    "dataset": (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    "not_int": (["--epochs", "many"], "invalid int value"),
    "teacher_missing": (["--teacher", "/nonexistent.pth"], "no such file"),
    "teacher_offline": (["--teacher", "pytorchcv"], "pass --teacher PATH"),
    "teacher_mismatch": (["--teacher", "C100"], "do not match ResNet-20 with 10 classes"),
    "data_missing": (["--data-dir", "EMPTY"], "cifar10 not found in"),
    "resume_no_ckpt": (["--resume", "RUNDIR"], "no checkpoint.pt there"),
    "resume_not_run": (["--resume", "EMPTY"], "no args.json there"),
    "batch_zero": (["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    "epochs_negative": (["--epochs", "-1"], "argument --epochs: -1 must be at least 0"),
    "eval_every_zero": (["--eval-every", "0"], "argument --eval-every: 0 must be at least 1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2(case, tiny_data, teachers, tmp_path):
    extra, msg = BAD[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text("{}")
    subst = {"C100": teachers["cifar100"], "EMPTY": str(tmp_path / "empty"), "RUNDIR": str(tmp_path / "run")}
    extra = [subst.get(a, a) for a in extra]
    args = ["gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
            "--epochs", "1", "--warmup-epochs", "1", "--iters-per-epoch", "1", "--batch-size", "4", *extra]
    r = run_script(args, cwd=ROOT)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr


@pytest.mark.slow
def test_tensorboard_writes_the_logged_metrics_or_says_what_to_install(tiny_data, teachers, tmp_path):
    r = gdfq(tiny_data, teachers, tmp_path, "--run-name", "tb", "--tensorboard")
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # the optional package is absent: one line, exit 2, before any work
        assert r.returncode == 2 and r.stderr.strip() == "error: --tensorboard needs the tensorboard package: " \
                                                         "pip install tensorboard"
        return
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    rows = metrics(tmp_path / "tb")
    top1 = acc.Scalars("eval/top1")
    assert [e.step for e in top1] == [row["iteration"] for row in rows] == [2, 4, 6]
    assert [e.value for e in top1] == pytest.approx([row["eval/top1"] for row in rows])
    assert "losses/loss_G" in acc.Tags()["scalars"]


RESUMABLE = {  # every other script: stopped inside its student epochs, then resumed
    "ait": ["ait.py", *TINY], "ait-batched": ["ait.py", *TINY, "--gi-search", "batched"],
    "akt": ["akt.py", *TINY], "lrq": ["lrq.py", *TINY],
    "faqd-ffa": ["faqd.py", "--epochs", "3", "--train-subset", "16", "--batch-size", "8", "--fa-type", "ffa"],
    "faqd-frozen": ["faqd.py", "--epochs", "3", "--train-subset", "16", "--batch-size", "8", "--alpha-mode", "frozen"],
    "sqakd": ["sqakd.py", "--epochs", "3", "--train-subset", "16", "--batch-size", "8"],
    "synq": ["synq.py", *TINY, "--num-images", "8", "--syn-batch", "4", "--syn-iters", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESUMABLE))
def test_every_script_resumes_exactly(case, tiny_data, teachers, tmp_path):
    """A run stopped after epoch 2 and resumed logs exactly what the uninterrupted run logs (optimizer states: GI's
    buffers and first-epoch flag, FAQD's FFA generator and step groups, SQAKD's two Adams; the RNG)."""
    args = [*RESUMABLE[case], "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
            "--device", "cpu", "--threads", "1"]
    assert run_script([*args, "--run-name", "full"], cwd=ROOT).returncode == 0
    r = run_script([*args, "--run-name", "cut", "--stop-after", "2"], cwd=ROOT)
    assert r.returncode == 0 and not (tmp_path / "cut" / "summary.json").exists(), r.stderr
    r = run_script([args[0], "--resume", str(tmp_path / "cut"), "--threads", "1"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    keys = [k for k in a[-1] if k.startswith(("losses/", "eval/", "charts/lr", "charts/gi_mean", "charts/gi_cap"))]
    assert len(a) == len(b) == 3 and [[x.get(k) for k in keys] for x in a] == [[x.get(k) for k in keys] for x in b]


@pytest.mark.slow
def test_resume_of_an_incompatible_checkpoint_is_one_line(tiny_data, teachers, tmp_path):
    args = ["faqd.py", "--epochs", "2", "--train-subset", "16", "--batch-size", "8", "--data-dir", tiny_data,
            "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path), "--run-name", "old", "--stop-after", "1"]
    assert run_script(args, cwd=ROOT).returncode == 0
    ckpt = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    ckpt["opt"]["param_groups"] = ckpt["opt"]["param_groups"][:1]  # as saved before the steps had their own group
    torch.save(ckpt, tmp_path / "old" / "checkpoint.pt")
    r = run_script(["faqd.py", "--resume", str(tmp_path / "old")], cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "does not match this version of faqd.py" in lines[0], r.stderr


def test_milestone_warning_advises_only_what_would_help(capsys):
    from common import lr_milestones
    # 'all' on a short run: the first decay (round(0.25 * 16) = 4) hits the first student epoch -> advise 'train'
    assert lr_milestones(16, 4, [0.25], "all") == [4]
    assert "use --milestones-from train" in capsys.readouterr().out
    # 'train' already, but 2 student epochs: round(0.25 * 2) = 0 -> epoch 4 again; the advice would not help
    assert lr_milestones(6, 4, [0.25], "train") == [4]
    out = capsys.readouterr().out
    assert "too few student epochs" in out and "use --milestones-from train" not in out
    # the short recipe: 7, 10, 13, no warning
    assert lr_milestones(16, 4, [0.25, 0.5, 0.75], "train") == [7, 10, 13]
    assert capsys.readouterr().out == ""


def test_tensorboard_can_be_switched_on_when_resuming(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    import gdfq
    (tmp_path / "args.json").write_text(json.dumps({"wbits": 4, "abits": 4, "epochs": 3, "tensorboard": False}))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert gdfq.parse(["--resume", str(tmp_path), "--tensorboard"]).tensorboard is True
    assert gdfq.parse(["--resume", str(tmp_path)]).tensorboard is False


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_format_still_resumes_exactly(tiny_data, teachers, tmp_path):
    """Checkpoints written before this version hold the RNG states as pickled numpy arrays and count epochs from 0:
    they load without unpickling anything else, resume exactly, and their metrics rows are renumbered from 1."""
    import numpy as np
    assert gdfq(tiny_data, teachers, tmp_path, "--run-name", "full").returncode == 0
    assert gdfq(tiny_data, teachers, tmp_path, "--run-name", "old", "--stop-after", "1").returncode == 0
    d = tmp_path / "old"
    ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
    ckpt["epoch"] = ckpt.pop("epochs_done") - 1
    del ckpt["teacher_top1"]
    version, internal, gauss = ckpt["rng"]["python"]
    name, keys, pos, has_gauss, cached = ckpt["rng"]["numpy"]
    ckpt["rng"]["python"] = (version, tuple(internal.tolist()), gauss)
    ckpt["rng"]["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    torch.save(ckpt, d / "checkpoint.pt")
    rows = metrics(d)
    (d / "metrics.jsonl").write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in rows))
    r = run_script(["gdfq.py", "--resume", str(d)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    a, b = metrics(tmp_path / "full"), metrics(d)
    keys = [k for k in a[0] if k.startswith(("losses/", "eval/", "charts/lr"))]
    assert [x["epoch"] for x in b] == [1, 2, 3]
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
