"""synq.py: its pieces against hand computations (the augmentation, the selective CE, KD, FA), the synthesis cache
(made once, continued after a kill, never regenerated on resume), and a run on the tiny dataset."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, random_teacher, run_script

import synq

SYN = ["--num-images", "8", "--syn-batch", "4", "--syn-iters", "2"]
GEN = ["--epochs", "3", "--warmup-epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8",
       "--milestones-from", "train"]


def test_random_resized_crop_full_crop_is_the_identity_and_crops_stay_in_scale():
    x = torch.randn(64, 3, 32, 32)
    same = synq.random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    # a constant image stays constant whatever the crop; a ramp's crop spans at least sqrt(0.5 * 3/4) of it
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(64, 1, 32, 32).contiguous()
    out = synq.random_resized_crop(ramp)
    span = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) / 2  # the crop's width as a fraction of the image's
    assert (span > math.sqrt(0.5 * 3 / 4) - 1e-3).all() and (span <= 1 + 1e-5).all()
    assert span.std() > 0.05  # crops differ between images
    const = torch.full((8, 3, 32, 32), 0.7)
    assert torch.allclose(synq.random_resized_crop(const), const)


def test_easy_ce_is_the_reference_masked_mean():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 2, 1])
    easy = torch.tensor([True, False, True])
    ce = synq.easy_ce(logits, y, easy)
    # by hand: rows 0 and 2 with their labels, row 1 as zero logits with label 0 (log 3), mean over all three
    by_hand = (-F.log_softmax(logits[0], 0)[0] - F.log_softmax(logits[2], 0)[1] + math.log(3)) / 3
    assert torch.allclose(ce, by_hand)
    ce.backward()
    assert torch.equal(logits.grad[1], torch.zeros(3))  # a difficult sample gets no hard-label gradient


def test_kd_loss_is_alpha_t2_batchmean_kl():
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    T, a = 20.0, 20.0
    p = F.softmax(t / T, 1)
    by_hand = (p * (p.log() - F.log_softmax(s / T, 1))).sum() / 5 * a * T * T
    assert torch.allclose(synq.kd_loss(s, t, T, a), by_hand, rtol=1e-4)


def test_fa_loss_sums_layer_mses_of_normalised_channel_attention():
    a = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    b = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    att = [lambda f: f.pow(2).mean((2, 3)) / f.pow(2).mean((2, 3)).norm(dim=1, keepdim=True)][0]
    by_hand = sum(((att(x) - att(y)) ** 2).mean() for x, y in zip(a, b))
    assert torch.allclose(synq.fa_loss(a, b), by_hand)


@pytest.mark.parametrize("hw", [(32, 32), (8, 8), (7, 5)])
def test_channel_attention_gradient_equals_autograds(hw):
    """The FA's channel attention has its own one-pass backward: the same value and gradient as autograd's graph of
    F.normalize(f.pow(2).mean((2, 3))), bit for bit when HW is a power of two, to float rounding otherwise."""
    torch.manual_seed(0)
    f = torch.randn(4, 6, *hw).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(4, 6)
    a = synq.channel_attention(f)
    b = F.normalize(f.pow(2).mean((2, 3)), dim=1)
    ga, gb = (torch.autograd.grad(t, f, g)[0] for t in (a, b))
    assert torch.equal(a, b)
    if hw[0] * hw[1] in (1024, 64):
        assert torch.equal(ga, gb)
    else:
        assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-7) and ga.abs().max() > 0


def test_the_step_backward_to_the_student_parameters_equals_the_full_backward():
    """The fine-tuning step's backward stops at the student's parameters: the same gradients, bit for bit, as the
    backward that runs on through the teacher to the images (whose gradient nothing reads); every trainable
    parameter gets one."""
    from types import SimpleNamespace

    import common
    torch.manual_seed(0)
    teacher = random_teacher(10)
    args = SimpleNamespace(wbits=4, abits=4, act_ema="plain", tau=0.5, temperature=20.0, kd_alpha=20.0,
                           lambda_ce=1.0, lambda_fa=4000.0, eps=0.01, fa_pert=0, lambda_pert=1.0, lambda_cam=100.0)
    student = synq.build_student(args, teacher)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    common.set_calibrating(student, True)
    with torch.no_grad():
        student(x)
    common.set_calibrating(student, False)
    s_taps, t_taps = synq.Taps(student), synq.Taps(teacher)
    grads = []
    for restrict in (False, True):
        student.zero_grad(set_to_none=True)
        xs = x.clone()
        loss, _ = synq.finetune_losses(args, student, teacher, s_taps, t_taps, xs, y)
        loss.backward(inputs=list(student.parameters())) if restrict else loss.backward()
        assert (xs.grad is None) == restrict
        grads.append([p.grad for p in student.parameters()])
    assert all(a is not None and torch.equal(a, b) for a, b in zip(*grads))


def test_variant_names_the_switched_off_terms():
    assert synq.variant({"lambda_ce": 0.5, "lambda_cam": 50, "lambda_pert": 1, "lambda_fa": 4000, "d_zero": 80}) \
        == "synq"
    assert synq.variant({"lambda_ce": 0.5, "lambda_cam": 0, "lambda_pert": 1, "lambda_fa": 4000, "d_zero": 0}) \
        == "synq-nocam-nolpf"


def test_synthesis_continues_a_cut_cache_exactly(tmp_path):
    teacher = random_teacher(10).requires_grad_(False)

    def make(n, folder, seed=0, arg_seed=0):
        args = synq.parse(["--teacher", "chenyaofo", "--num-images", str(n), "--syn-batch", "3", "--syn-iters", "3",
                           "--seed", str(arg_seed)])
        (tmp_path / folder).mkdir(exist_ok=True)
        torch.manual_seed(seed)
        return synq.synthesize(args, teacher, str(tmp_path / folder / "synthetic.pt"), torch.device("cpu"), 10)

    x, y = make(6, "full")
    after = torch.rand(1)
    assert x.shape == (6, 3, 32, 32) and y.shape == (6,)
    assert len(torch.load(tmp_path / "full" / "synthetic.pt", weights_only=True)["images"]) == 2
    make(3, "one")  # its random state is the one after the first batch
    cut = torch.load(tmp_path / "full" / "synthetic.pt", weights_only=True)  # as a run killed after batch 1 leaves it
    cut["images"], cut["labels"] = cut["images"][:1], cut["labels"][:1]
    cut["rng"] = torch.load(tmp_path / "one" / "synthetic.pt", weights_only=True)["rng"]
    (tmp_path / "cut").mkdir()
    torch.save(cut, tmp_path / "cut" / "synthetic.pt")
    x2, y2 = make(6, "cut", seed=12345)  # the same command restarted: its random state is the cache's
    assert torch.equal(x2, x) and torch.equal(y2, y) and torch.equal(torch.rand(1), after)
    x3, _ = make(6, "full", seed=99, arg_seed=99)  # a finished set is loaded as it is; another --seed keeps its state
    assert torch.equal(x3, x) and torch.equal(torch.rand(3), torch.manual_seed(99) and torch.rand(3))
    with pytest.raises(synq.UserError, match="made with other settings \\(num_images\\)"):
        make(9, "full")


@pytest.mark.slow
def test_run_resume_and_the_cache_is_not_regenerated(tiny_data, teachers, tmp_path):
    base = ["synq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
            "--device", "cpu", "--threads", "1", *GEN, *SYN]
    r = run_script([*base, "--run-name", "cut", "--stop-after", "2"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("synthesis batch") == 2
    r = run_script(["synq.py", "--resume", str(tmp_path / "cut"), "--threads", "1"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "synthesis batch" not in r.stdout  # loaded from the run directory
    s = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert s["epochs_done"] == 3 and s["final_top1"] is not None and s["calibrated_top1"] is not None
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert {"losses/kd", "losses/ce", "losses/fa", "losses/cam", "losses/loss_p", "charts/easy_frac"} <= set(rows[-1])
    assert os.path.getsize(tmp_path / "cut" / "synthetic.pt") > 8 * 3 * 32 * 32 * 4  # float32 images


@pytest.mark.slow
def test_ctrl_c_during_the_synthesis_says_how_to_go_on_and_nothing_is_lost(tiny_data, teachers, tmp_path):
    """Ctrl-C after the first of two synthesis batches: one line naming the file and --synthetic; the same command
    with --synthetic FILE makes only the second batch, and the set equals an uninterrupted run's."""
    import signal
    import subprocess
    import sys
    syn = ["--num-images", "8", "--syn-batch", "4", "--syn-iters", "400"]
    args = ["synq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
            "--device", "cpu", "--threads", "1", *GEN, *syn]
    assert run_script([*args, "--run-name", "full"], cwd=ROOT).returncode == 0
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, *args, "--run-name", "cut"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if "synthesis batch 1/2" in line:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    path = tmp_path / "cut" / "synthetic.pt"
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert "during the synthesis" in err and f"--synthetic {path}" in err and "Traceback" not in err
    r = run_script([*args, "--run-name", "again", "--synthetic", str(path)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "synthesis batch 2/2" in r.stdout and "synthesis batch 1/2" not in r.stdout
    a = torch.load(tmp_path / "full" / "synthetic.pt", weights_only=True)
    b = torch.load(path, weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a["images"], b["images"])) and len(b["images"]) == 2


def test_a_bad_synthetic_path_is_one_line_of_user_error(tmp_path):
    args = synq.parse(["--teacher", "chenyaofo", "--num-images", "3", "--syn-batch", "3", "--syn-iters", "1"])
    teacher = random_teacher(10).requires_grad_(False)
    (tmp_path / "junk.pt").write_text("junk")
    torch.save({"a": 1}, tmp_path / "other.pt")
    for path, msg in ((tmp_path, "give a file in an existing folder"),
                      (tmp_path / "no" / "x.pt", "give a file in an existing folder"),
                      (tmp_path / "junk.pt", "cannot read"), (tmp_path / "other.pt", "is not a synthetic set")):
        with pytest.raises(synq.UserError, match=msg):
            synq.synthesize(args, teacher, str(path), torch.device("cpu"), 10)
