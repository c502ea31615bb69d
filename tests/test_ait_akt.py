"""AIT's gradient inundation, AKT's RFD and AdaDFQ's losses against hand computations; smoke runs of both."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_teacher_acc_gen, run_script

from ait import GradientInundation
from akt import adadfq_generator_loss, adadfq_student_loss, attentions, channel_attention, rfd_loss, spatial_attention
from common import weight_codes


def toy_weight(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(8, 4, 3, 3))


def changed(p_before, p_after, bits=4):
    return (weight_codes(p_before, bits) != weight_codes(p_after, bits)).float().mean().item()


def gi_step(p, grad, lr, th, cap=1024.0, result="upper"):
    p.grad = grad.clone()
    before = p.detach().clone()
    opt = GradientInundation([p], lr=lr, wbits=4, threshold=th, alpha_cap=cap, result=result)
    opt.step()
    return opt, before


def test_gi_reaches_threshold_with_smallest_power_bracket():
    p = toy_weight()
    opt, before = gi_step(p, torch.randn_like(p), lr=1e-3, th=0.05)
    alpha = opt.last_alphas[0]
    assert 2 < alpha < 1024  # neither plain SGD nor the cap
    assert changed(before, p.detach()) >= 0.05
    # the doubling stopped at the first power of two that crosses: the one below it did not
    d = p.grad + 0.9 * p.grad  # first step: buffer = grad, Nesterov direction = g + 0.9 * buffer
    pow2 = 2 ** math.ceil(math.log2(alpha))
    assert changed(before, before - 1e-3 * (pow2 / 2) * d) < 0.05 <= changed(before, before - 1e-3 * pow2 * d)
    assert alpha > pow2 / 2 and torch.allclose(p.detach(), before - 1e-3 * alpha * d)
    assert torch.equal(opt.state[p]["buf"], p.grad)  # the buffer keeps the raw gradient, not the scaled step


def test_gi_alpha_one_when_sgd_already_crosses():
    p = toy_weight(1)
    opt, before = gi_step(p, torch.randn_like(p), lr=1.0, th=0.01)
    assert opt.last_alphas == [1.0] and changed(before, p.detach()) >= 0.01


def test_gi_alpha_capped_and_zero_gradient_terminates():
    # doubling stops once alpha passes the cap (8 -> 16); the bisection on [8, 16] never reaches the threshold, so
    # the reference's last midpoint is 8 + 4 + 2 + 1 + 0.5 + 0.25 = 15.75, the upper end stays 16
    p = toy_weight(2)
    opt, before = gi_step(p, torch.randn_like(p), lr=1e-9, th=0.5, cap=8.0, result="midpoint")
    assert opt.last_alphas == [15.75] and opt.cap_hits == 1
    p = toy_weight(2)
    opt, before = gi_step(p, torch.randn_like(p), lr=1e-9, th=0.5, cap=8.0, result="upper")
    assert opt.last_alphas == [16.0]
    # a zero gradient under the reference's first-epoch cap (100): 128, then the futile bisection on [64, 128]
    p = toy_weight(3)
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    opt = GradientInundation([p], lr=1e-3, wbits=4, threshold=1e-3)
    opt.first_epoch = True
    opt.step()
    assert opt.last_alphas == [126.0] and torch.equal(p.detach(), before) and opt.cap_hits == 1


def test_gi_second_step_uses_momentum():
    p = toy_weight(4)
    g1, g2 = torch.randn_like(p), torch.randn_like(p)
    opt = GradientInundation([p], lr=1.0, wbits=4, threshold=1e-6, weight_decay=0.0)
    p.grad = g1.clone()
    opt.step()
    before = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    buf = 0.9 * g1 + g2
    assert torch.allclose(opt.state[p]["buf"], buf)
    assert torch.allclose(p.detach(), before - opt.last_alphas[0] * (g2 + 0.9 * buf), atol=1e-6)


def test_attention_maps_hand_values():
    f = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # B=1, C=2, H=1, W=2
    # channel: mean_HW f^2 = [5, 2] -> softmax
    e5, e2 = math.exp(5), math.exp(2)
    assert torch.allclose(channel_attention(f), torch.tensor([[e5 / (e5 + e2), e2 / (e5 + e2)]]))
    # spatial: mean_C f^2 = [2.5, 4.5] -> L2 normalised
    n = math.hypot(2.5, 4.5)
    assert torch.allclose(spatial_attention(f), torch.tensor([[2.5 / n, 4.5 / n]]))


@pytest.mark.parametrize("shape", [(3, 16, 32, 32), (3, 64, 8, 8), (3, 6, 7, 5)])
def test_attentions_gradient_equals_autograds(shape):
    """RFD's two attentions share one f^2 and one backward: the same values and gradient as autograd's graph of the
    plain expressions, bit for bit where C and HW are powers of two, to float rounding otherwise."""
    torch.manual_seed(0)
    f = torch.randn(*shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    g_ch, g_sp = torch.randn(shape[:2]), torch.randn(shape[0], shape[2] * shape[3])
    ch, sp = attentions(f)
    ch0 = F.softmax(f.pow(2).mean((2, 3)), dim=1)
    sp0 = F.normalize(f.pow(2).mean(1).flatten(1), dim=1)
    assert torch.equal(ch, ch0) and torch.equal(sp, sp0)
    ga = torch.autograd.grad((ch * g_ch).sum() + (sp * g_sp).sum(), f)[0]
    gb = torch.autograd.grad((ch0 * g_ch).sum() + (sp0 * g_sp).sum(), f)[0]
    if shape[1] in (16, 64):
        assert torch.equal(ga, gb)
    else:
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-8) and ga.abs().max() > 0


def test_rfd_hand_value_zero_and_gradients():
    fs = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]], requires_grad=True)
    ft = torch.tensor([[[[0.0, 1.0]], [[1.0, 2.0]]]], requires_grad=True)

    def kl(a, b, T=8.0):  # sum_i softmax(b/T)_i * (log softmax(b/T)_i - log softmax(a/T)_i)
        pa = [math.exp(v / T) for v in a]
        pb = [math.exp(v / T) for v in b]
        pa, pb = [v / sum(pa) for v in pa], [v / sum(pb) for v in pb]
        return sum(q * (math.log(q) - math.log(p)) for p, q in zip(pa, pb))

    def ch(x):
        e = [math.exp(v) for v in x]
        return [v / sum(e) for v in e]

    def sp(x):
        n = math.hypot(*x)
        return [v / n for v in x]
    # student: channel means [5, 2], spatial means [2.5, 4.5]; teacher: channel [0.5, 2.5], spatial [0.5, 2.5]
    expect = kl(ch([5, 2]), ch([0.5, 2.5])) + kl(sp([2.5, 4.5]), sp([0.5, 2.5]))
    loss = rfd_loss([fs], [ft])
    assert abs(loss.item() - expect) < 1e-6 and loss.item() > 0
    loss.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0 and ft.grad is None  # teacher side detached
    assert rfd_loss([fs.detach()], [fs.detach()]).abs().item() < 1e-6 < expect / 1000


def test_adadfq_losses_hand_values():
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1])

    def logsm(v):
        m = math.log(sum(math.exp(a) for a in v))
        return [a - m for a in v]

    def ent(v):
        return -sum(math.exp(a) * a for a in logsm(v))
    d, p = (t - s).tolist(), (t + s).tolist()
    onehot = 0.2 * -(logsm(d[0])[0] + logsm(d[1])[1]) / 2 + 0.1 * -(logsm(p[0])[0] + logsm(p[1])[1]) / 2
    h = [ent(d[0]), ent(d[1])]
    hn = [(v - min(h)) / (math.log(3) - min(h)) for v in h]
    h_loss = sum(max(0.1 - v, 0) for v in hn) / 2 + sum(max(v - 0.8, 0) for v in hn) / 2
    assert abs(adadfq_generator_loss(t, s, y, 3).item() - (h_loss + onehot)) < 1e-6
    d20 = ((t - s) / 20).tolist()
    assert abs(adadfq_student_loss(t, s, 20.0, 400.0).item() - (-400 * (ent(d20[0]) + ent(d20[1])) / 2)) < 1e-4


SMOKE = ["--epochs", "2", "--warmup-epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8",
         "--milestones-from", "train", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("ait.py", []), ("ait.py", ["--no-gi"]), ("akt.py", ["--base", "adadfq"]),
                                          ("akt.py", ["--base", "gdfq", "--dataset", "cifar100"])])
def test_smoke(script, extra, tiny_data, teachers, tmp_path):
    ds = "cifar100" if "cifar100" in extra else "cifar10"
    r = run_script([script, "--data-dir", tiny_data, "--teacher", teachers[ds], "--out-dir", str(tmp_path),
                    "--run-name", "r", *SMOKE, *extra], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["epochs_done"] == 2 and s["final_top1"] is not None and s["calibrated_top1"] is not None
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(v) for k, v in rows[-1].items() if k.startswith("losses/"))
    assert_teacher_acc_gen(rows, 2 * 8)
    if script == "akt.py":
        assert rows[-1]["losses/rfd"] > 0  # the feature term is really computed (the release's is always 0)
    if extra == []:
        assert rows[-1]["charts/gi_mean_alpha"] >= 1


@pytest.mark.slow
def test_ait_akt_bad_bits(tiny_data, teachers, tmp_path):
    for script in ("ait.py", "akt.py"):
        r = run_script([script, "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--wbits", "1"], cwd=ROOT)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "out of range" in r.stderr


@pytest.mark.parametrize("result", ["midpoint", "upper"])
def test_gi_batched_search_equals_sequential(result):
    """The host-sync-free search (CUDA's default) chooses the same alpha as the sequential one, over random tensors,
    thresholds, caps (first epoch or not) and three steps of momentum."""
    for seed in range(6):
        torch.manual_seed(seed)
        w = torch.randn(16, 8, 3, 3) * 0.1
        grads = [torch.randn_like(w) * 10.0 ** torch.randint(-6, 0, ()).item() for _ in range(3)]
        th = [1e-3, 1e-2, 0.2][seed % 3]
        runs = []
        for batched in (False, True):
            p = torch.nn.Parameter(w.clone())
            opt = GradientInundation([p], lr=1e-3, wbits=4, threshold=th, alpha_cap=2.0 ** (6 + seed),
                                     result=result, batched=batched)
            opt.first_epoch = seed % 2 == 0
            seen = []
            for g in grads:
                p.grad = g.clone()
                opt.step()
                seen.append(float(opt.last_alphas[0]))
            runs.append((seen, p.detach().clone(), int(opt.cap_hits)))
        assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2]
        assert torch.allclose(runs[0][1], runs[1][1], rtol=0, atol=1e-6)
