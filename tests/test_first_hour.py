"""What a new user meets first: schedules that cannot train are refused, Ctrl-C and SIGTERM end a run with one line
and a resumable checkpoint, a resume cannot silently change the recipe, --help shows every default, progress and a
first ETA come early, and an unreadable teacher file is named for what it is not."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script

GENERATOR_SCRIPTS = ["gdfq.py", "ait.py", "akt.py", "lrq.py", "synq.py"]
SCRIPTS = GENERATOR_SCRIPTS + ["faqd.py", "sqakd.py"]


def run(args):
    return run_script(args, cwd=ROOT)


def base(tiny_data, teachers, tmp_path, script="gdfq.py"):
    return [script, "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
            "--device", "cpu", "--threads", "1", "--batch-size", "8"]


def one_error_line(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.returncode, r.stderr)
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("script", GENERATOR_SCRIPTS)
def test_no_warmup_is_refused_the_ranges_would_never_calibrate(script, tiny_data, teachers, tmp_path):
    r = run([*base(tiny_data, teachers, tmp_path, script), "--warmup-epochs", "0", "--epochs", "2"])
    one_error_line(r, "--warmup-epochs 0", "uncalibrated")
    assert not os.listdir(tmp_path)  # refused before any run directory is made


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_is_refused(tiny_data, teachers, tmp_path):
    r = run([*base(tiny_data, teachers, tmp_path), "--warmup-epochs", "3", "--epochs", "2"])
    one_error_line(r, "--warmup-epochs 3 is more than --epochs 2", "never train")


@pytest.mark.slow
def test_warmup_equal_to_epochs_warns_and_records_the_calibrated_baseline(tiny_data, teachers, tmp_path):
    r = run([*base(tiny_data, teachers, tmp_path), "--warmup-epochs", "1", "--epochs", "1", "--iters-per-epoch", "2",
             "--run-name", "calib"])
    assert r.returncode == 0, r.stderr
    assert "warning: --epochs 1 equals --warmup-epochs: the student never trains" in r.stdout
    s = json.loads((tmp_path / "calib" / "summary.json").read_text())
    assert s["calibrated_top1"] is not None and s["calibrated_top1"] == s["final_top1"]


def _start(args):
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_line(p, needle, timeout=300):
    t0, seen = time.time(), []
    for line in p.stdout:
        seen.append(line)
        if needle in line:
            return seen
        assert time.time() - t0 < timeout, "".join(seen)
    raise AssertionError("".join(seen) + p.stderr.read())


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_prints_one_line_and_the_run_resumes_exactly(sig, code, tiny_data, teachers, tmp_path):
    """Ctrl-C / SIGTERM in epoch 3: one line naming the checkpoint after epoch 2 and the --resume command, exit 130
    / 143; the resumed run then logs exactly what an uninterrupted run logs."""
    args = [*base(tiny_data, teachers, tmp_path), "--warmup-epochs", "1", "--epochs", "4", "--iters-per-epoch", "6",
            "--milestones-from", "train"]
    assert run([*args, "--run-name", "full"]).returncode == 0
    p = _start([*args, "--run-name", "cut"])
    _wait_for_line(p, "epoch 2/4")
    time.sleep(0.3)  # inside epoch 3
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == code and len(lines) == 1, err
    cut = tmp_path / "cut"
    assert lines[0].startswith(f"interrupted ({sig.name})") and "Traceback" not in err
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=False)
    done = ckpt["epochs_done"]  # 2, or 3 if epoch 3 ended before the signal arrived
    assert f"the checkpoint after epoch {done} is in {cut / 'checkpoint.pt'}" in lines[0]
    assert lines[0].endswith(f"continue with: python gdfq.py --resume {cut}")
    r = run(["gdfq.py", "--resume", str(cut), "--threads", "1"])
    assert r.returncode == 0, r.stderr
    assert f"resumed {cut} after epoch {done}" in r.stdout

    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    a, b = rows(tmp_path / "full"), rows(cut)
    keys = [k for k in a[0] if k.startswith(("losses/", "eval/", "charts/lr"))]
    assert [x["epoch"] for x in b] == [1, 2, 3, 4]
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]


@pytest.mark.slow
def test_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(tiny_data, teachers, tmp_path):
    p = _start([*base(tiny_data, teachers, tmp_path), "--warmup-epochs", "1", "--epochs", "2",
                "--iters-per-epoch", "1000", "--run-name", "early"])
    _wait_for_line(p, "teacher top-1")
    p.send_signal(signal.SIGINT)  # before the loop starts
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert "before the first epoch ended: nothing to resume; remove" in err and str(tmp_path / "early") in err
    p = _start([*base(tiny_data, teachers, tmp_path), "--warmup-epochs", "1", "--epochs", "2",
                "--iters-per-epoch", "1000", "--run-name", "early2"])
    _wait_for_line(p, "s/iteration over iterations 2-4")  # the first ETA: inside epoch 1
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert "in epoch 1/2, before the first checkpoint: nothing to resume" in err and str(tmp_path / "early2") in err


def test_a_signal_while_the_checkpoint_is_written_waits_for_it():
    import common
    common._INTERRUPT.update(defer=True, pending=None)
    try:
        common._on_signal(signal.SIGTERM, None)  # deferred: no exception, remembered
        assert common._INTERRUPT["pending"] == signal.SIGTERM
        common._INTERRUPT["defer"] = False
        with pytest.raises(common.Interrupted):
            common._on_signal(signal.SIGINT, None)
    finally:
        common._INTERRUPT.update(defer=False, pending=None)


@pytest.fixture(scope="module")
def stopped_run(tiny_data, teachers, tmp_path_factory):
    """A gdfq run stopped after epoch 1 of 3, whose checkpoint's teacher figure is marked."""
    out = tmp_path_factory.mktemp("stopped")
    args = ["gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(out),
            "--device", "cpu", "--threads", "1", "--batch-size", "8", "--warmup-epochs", "1", "--epochs", "3",
            "--iters-per-epoch", "2", "--run-name", "s", "--stop-after", "1"]
    assert run(args).returncode == 0
    return out / "s"


@pytest.mark.slow
@pytest.mark.parametrize("flag,value,saved", [("--epochs", "5", "3"), ("--lr-s", "0.01", "0.0001"),
                                              ("--wbits", "3", "4"), ("--milestones", "0.5", "0.25 0.5 0.75"),
                                              ("--teacher", "chenyaofo", None)])
def test_resume_refuses_a_training_flag_that_differs(stopped_run, flag, value, saved):
    r = run(["gdfq.py", "--resume", str(stopped_run), flag, value])
    one_error_line(r, f"{flag} {value} differs from the saved run's {saved or ''}".rstrip(), "drop the flag")
    assert "--eval-every" in r.stderr  # the message lists what may change


@pytest.mark.slow
def test_resume_accepts_equal_and_allowed_flags_and_keeps_the_teacher_figure(stopped_run, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(stopped_run, d)
    ckpt = torch.load(d / "checkpoint.pt", weights_only=False)
    ckpt["teacher_top1"] = 12.34  # a resume reads the teacher's figure from the checkpoint, it does not re-score
    torch.save(ckpt, d / "checkpoint.pt")
    r = run(["gdfq.py", "--resume", str(d), "--epochs", "3", "--wbits", "4", "--threads", "1", "--eval-every", "2"])
    assert r.returncode == 0, r.stderr
    assert "teacher top-1 12.34" in r.stdout
    s = json.loads((d / "summary.json").read_text())
    assert s["teacher_top1"] == 12.34 and s["args"]["eval_every"] == 2 and s["args"]["epochs"] == 3
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == [1, 2, 3] and rows[1]["eval/top1"] == rows[0]["eval/top1"]  # epoch 2 unscored


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    r = run([script, "--help"])
    assert r.returncode == 0
    blocks, cur = [], None
    for line in r.stdout.split("options:")[1].splitlines():
        if line.startswith("  -"):
            cur = [line]
            blocks.append(cur)
        elif cur is not None:
            cur.append(line)
    flags = [" ".join(b).split()[0] for b in blocks]
    assert len(flags) > 20
    missing = [f for f, b in zip(flags, blocks) if f != "-h," and "default" not in " ".join(b)]
    assert not missing, missing
    text = " ".join(r.stdout.split())
    assert "(default: 0)" in text and "--seed" in text  # e.g. the seed's default is shown as a value


@pytest.mark.slow
def test_first_eta_comes_after_a_few_iterations(tiny_data, teachers, tmp_path):
    r = run([*base(tiny_data, teachers, tmp_path), "--warmup-epochs", "1", "--epochs", "2", "--iters-per-epoch", "5"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    first = next(i for i, x in enumerate(lines) if "s/iteration over iterations 2-4" in x)
    assert "ETA of the run" in lines[first] and "(this epoch and 1 more)" in lines[first]
    assert first < next(i for i, x in enumerate(lines) if x.startswith("epoch 1/2"))
    assert sum("s/iteration" in x for x in lines) == 1


@pytest.mark.slow
def test_a_terminal_gets_a_progress_line_within_the_epoch(tiny_data, teachers, tmp_path):
    import pty
    master, slave = pty.openpty()
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, *base(tiny_data, teachers, tmp_path), "--warmup-epochs", "1", "--epochs",
                          "1", "--iters-per-epoch", "40"], cwd=ROOT, env=env, stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=300)
    os.close(master)
    text = out.decode()
    assert p.returncode == 0 and "\r  epoch 1/1: iteration " in text and "left in the epoch" in text, text


@pytest.mark.slow
def test_unreadable_teacher_file_says_what_it_is_not(tiny_data, tmp_path):
    bad = tmp_path / "teacher.pth"
    bad.write_text("not weights")
    lst = tmp_path / "list.pth"
    torch.save([1, 2], lst)
    for path, msg in ((bad, "is not a PyTorch weights file"), (lst, "holds a list, not a state_dict")):
        r = run(["gdfq.py", "--data-dir", tiny_data, "--teacher", str(path), "--epochs", "0", "--out-dir",
                 str(tmp_path)])
        one_error_line(r, msg)


@pytest.mark.slow
def test_skipped_parity_tests_are_counted_at_the_end_and_can_be_required(tmp_path):
    """Without the teacher, the parity tests that need it skip and the run's last lines say so; with
    CLEANQD_REQUIRE_PARITY=1 they fail instead."""
    env = {**os.environ, "CLEANQD_TEST_TEACHERS": str(tmp_path)}  # an empty folder: no teacher there
    env.pop("CLEANQD_REQUIRE_PARITY", None)
    test = "tests/test_parity_gdfq.py::test_student_loss_and_sgd_step"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    tail = r.stdout.strip().splitlines()[-4:]
    assert r.returncode == 0 and any("PARITY NOT CHECKED: 1 parity tests were skipped" in x for x in tail), r.stdout
    assert "cifar10_resnet20_chenyaofo.pth not found" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT,
                       env={**env, "CLEANQD_REQUIRE_PARITY": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout
