"""LRQ (our reading): LKA block, angular margin logits, DKD against hand computations; smoke runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_teacher_acc_gen, run_script

from lrq import DilatedDepthwiseConv, Generator, LKABlock, dkd_loss, margin_logits


def test_lka_block_shapes_and_gating():
    torch.manual_seed(0)
    blk = LKABlock(8)
    x = torch.randn(2, 8, 16, 16)
    out = blk(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert blk.lka.dw_dilated.dilation == (3, 3) and blk.lka.dw.groups == 8  # 5x5 -> 7x7 dil 3: 21x21 field
    # zero attention map (LKA's last 1x1 all zero): the gated product vanishes, only proj_out's bias is left
    torch.nn.init.zeros_(blk.lka.pw.weight)
    torch.nn.init.zeros_(blk.lka.pw.bias)
    assert torch.allclose(blk(x), x + blk.proj_out.bias.view(1, -1, 1, 1))
    g = Generator(10)
    assert g(torch.randn(4, 100), torch.randint(0, 10, (4,))).shape == (4, 3, 32, 32)
    assert sum(p.numel() for p in g.parameters()) > sum(p.numel() for p in Generator(10, lka=False).parameters())


@pytest.mark.parametrize("hw", [32, 16, 7])
def test_dilated_depthwise_conv_equals_dilated_conv(hw):
    """The sub-grid folding computes the same dilated depthwise conv: outputs and gradients (x, weight, bias)."""
    torch.manual_seed(hw)
    m = DilatedDepthwiseConv(6, 7, 3)
    x = torch.randn(3, 6, hw, hw, requires_grad=True)
    y = m(x)
    ref = F.conv2d(x, m.weight, m.bias, padding=9, dilation=3, groups=6)
    assert y.shape == ref.shape == x.shape and torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    params = (x, m.weight, m.bias)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, atol=1e-4)


def test_margin_logits_hand_value():
    fc = torch.nn.Linear(2, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0], [-1.0, 0.5]]))
        fc.bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
    feat = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([0, 1])
    plain = fc(feat)
    assert torch.equal(margin_logits(fc(feat), feat, fc, y, 0.0), plain)
    out = margin_logits(fc(feat), feat, fc, y, math.pi / 4)
    # sample 0: ||W_0||·||f|| = sqrt(2), theta = pi/4, cos(pi/2) = 0 -> target = b_0 = 0.5
    assert abs(out[0, 0].item() - 0.5) < 1e-5
    # sample 1: ||W_1|| = 2, ||f|| = 5, cos theta = 8/10 -> 10·cos(acos(0.8) + pi/4) - 0.2
    assert abs(out[1, 1].item() - (10 * math.cos(math.acos(0.8) + math.pi / 4) - 0.2)) < 1e-4
    mask = F.one_hot(y, 3).bool()
    assert torch.equal(out[~mask], plain[~mask])  # other logits unchanged
    small = margin_logits(fc(feat), feat, fc, y, 0.3)
    assert (small[mask] < plain[mask]).all()  # cos(theta + m) < cos(theta) for theta + m < pi


def test_dkd_hand_value():
    s = torch.tensor([[1.0, 0.5, -0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([0])
    T = 2.0

    def sm(v):
        e = [math.exp(a / T) for a in v]
        return [a / sum(e) for a in e]
    ps, pt = sm(s[0].tolist()), sm(t[0].tolist())
    bs, bt = [ps[0], 1 - ps[0]], [pt[0], 1 - pt[0]]
    tckd = sum(q * math.log(q / p) for p, q in zip(bs, bt)) * T * T
    qs, qt = sm(s[0, 1:].tolist()), sm(t[0, 1:].tolist())  # non-target classes, renormalised
    nckd = sum(q * math.log(q / p) for p, q in zip(qs, qt)) * T * T
    assert abs(dkd_loss(s, t, y, 1.0, 8.0, T).item() - (tckd + 8 * nckd)) < 1e-5
    assert abs(dkd_loss(s, t, y, 0.0, 1.0, T).item() - nckd) < 1e-5


def test_dkd_finite_for_a_saturated_teacher():
    # regression: generated images make the teacher so confident that the non-target mass underflows to 0;
    # 0 * log 0 must count as 0 (it gave NaN in a real run before the fix)
    t = torch.tensor([[1000.0, 0.0, 0.0], [0.0, 0.0, 1000.0]])  # exp(-1000/4) = 0 in float32: the old formula gave NaN
    s = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 1.0]], requires_grad=True)
    loss = dkd_loss(s, t, torch.tensor([0, 2]), 1.0, 8.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and loss > 0


def test_dkd_decomposition_of_kd():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10) * 2, torch.randint(0, 10, (6,))
    T = 4.0
    for i in range(6):  # per sample: KD = TCKD + (1 - p_t(target)) * NCKD
        si, ti, yi = s[i:i + 1], t[i:i + 1], y[i:i + 1]
        kd = F.kl_div(F.log_softmax(si / T, 1), F.softmax(ti / T, 1), reduction="sum") * T * T
        w = 1 - F.softmax(ti / T, 1)[0, yi].item()
        assert abs(dkd_loss(si, ti, yi, 1.0, w, T).item() - kd.item()) < 1e-4


SMOKE = ["--epochs", "2", "--warmup-epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8",
         "--milestones-from", "train", "--threads", "1"]


def _run(script, name, tiny_data, teachers, tmp_path, extra=()):
    r = run_script([script, "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
                    "--run-name", name, *SMOKE, *extra], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / name / "summary.json").read_text()), rows


@pytest.mark.slow
def test_smoke(tiny_data, teachers, tmp_path):
    s, rows = _run("lrq.py", "r", tiny_data, teachers, tmp_path)
    assert_teacher_acc_gen(rows, 2 * 8)
    assert s["epochs_done"] == 2 and s["final_top1"] is not None and s["args"]["kd"] == "dkd"


@pytest.mark.slow
def test_all_components_off_is_gdfq(tiny_data, teachers, tmp_path):
    """The ablation's baseline: with LKA, AMA and DKD off, lrq.py is GDFQ step for step. Equal to float rounding,
    not bitwise: lrq keeps the teacher's features alive, which moves oneDNN's buffers and so its summation order."""
    _, off = _run("lrq.py", "off", tiny_data, teachers, tmp_path, ["--no-lka", "--ama-margin", "0", "--kd", "kl"])
    _, ref = _run("gdfq.py", "gdfq", tiny_data, teachers, tmp_path)
    assert len(off) == len(ref) == 2
    for a, b in zip(off, ref):
        for k in b:
            if k.startswith(("losses/", "eval/")):
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-3), k



@pytest.mark.slow
def test_dkd_ramp_scales_the_student_gradient(tiny_data, teachers, tmp_path):
    """In the 1st of N ramp epochs DKD's gradient is x 1/N: with SGD and no weight decay that is the same run as
    no ramp at 1/N of the lr (x 0.5 is exact in floating point)."""
    # a large lr, so that one step visibly moves the next iteration's loss (at the default 1e-4 the random tiny
    # student's DKD loss, about 1e-3, moves by less than float32 resolves after one step)
    dkd = ["--no-lka", "--ama-margin", "0", "--kd", "dkd", "--weight-decay", "0"]
    _, ramped = _run("lrq.py", "ramp", tiny_data, teachers, tmp_path, dkd + ["--dkd-warmup", "2", "--lr-s", "0.05"])
    _, half_lr = _run("lrq.py", "half", tiny_data, teachers, tmp_path, dkd + ["--dkd-warmup", "0", "--lr-s", "0.025"])
    _, plain = _run("lrq.py", "plain", tiny_data, teachers, tmp_path, dkd + ["--dkd-warmup", "0", "--lr-s", "0.05"])
    assert [r["charts/dkd_ramp"] for r in ramped] == [0.0, 0.5] and plain[1]["charts/dkd_ramp"] == 1.0
    assert ramped[1]["losses/loss_S"] == pytest.approx(half_lr[1]["losses/loss_S"], rel=1e-5)
    # the tiny student's last-epoch loss does depend on the step size (else this test could not fail)
    assert ramped[1]["losses/loss_S"] != pytest.approx(plain[1]["losses/loss_S"], rel=1e-5)


@pytest.mark.slow
def test_dkd_ce_weight_changes_the_student_step(tiny_data, teachers, tmp_path):
    """--dkd-ce-weight 1 (mdistiller's distiller) adds CE to the step: same run otherwise, another student."""
    dkd = ["--no-lka", "--ama-margin", "0", "--dkd-warmup", "0", "--lr-s", "0.05"]
    s, ce = _run("lrq.py", "ce", tiny_data, teachers, tmp_path, dkd + ["--dkd-ce-weight", "1"])
    _, plain = _run("lrq.py", "noce", tiny_data, teachers, tmp_path, dkd)
    assert s["args"]["dkd_ce_weight"] == 1.0
    assert ce[0]["losses/loss_S"] == plain[0]["losses/loss_S"]  # warm-up: no student step yet, same generator
    assert ce[1]["losses/loss_S"] != pytest.approx(plain[1]["losses/loss_S"], rel=1e-6)
