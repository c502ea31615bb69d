"""FAQD (feature affinity, its sketch, its quantizers) and SQAKD (unified quantizer, initialisation); smoke runs."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, random_teacher, run_script

from faqd import FAQDReLU, fa_loss, ffa_loss, project_weight
from sqakd import UQConv2d, build_student, discretise, initialise, kd_loss, unified


def test_fa_hand_value():
    # student positions (1,0) and (0,1): A_s = I; teacher positions (1,0) and (1,0): A_t = all ones
    fs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)
    ft = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    loss = fa_loss(fs, ft)
    assert abs(loss.item() - 2 / 4) < 1e-4  # |off-diagonals| = 2, over (HW)^2 = 4
    loss.backward()
    assert fs.grad is not None
    assert fa_loss(ft, ft).item() == 0.0
    # batch: summed over samples
    assert abs(fa_loss(torch.cat([fs.detach()] * 3), torch.cat([ft] * 3)).item() - 1.5) < 1e-4


@pytest.mark.parametrize("chunk", [1 << 21, 50, 1])  # one chunk, several, one image per chunk
def test_fa_chunked_equals_the_plain_expression(monkeypatch, chunk):
    """fa_loss computes ||S^T S - T^T T||_1 a few images at a time with its own backward: its value and gradient
    against the plain expression through autograd, in float64 (equal to rounding), over chunk sizes."""
    import faqd
    monkeypatch.setattr(faqd._AffinityL1, "CHUNK", chunk)
    torch.manual_seed(0)
    fs = torch.randn(5, 6, 4, 3, dtype=torch.float64).relu().requires_grad_(True)
    ft = torch.randn(5, 6, 4, 3, dtype=torch.float64).relu()
    s, t = (f.flatten(2) / (f.flatten(2).norm(dim=1, keepdim=True) + 1e-5) for f in (fs, ft))
    plain = (s.transpose(1, 2) @ s - t.transpose(1, 2) @ t).abs().sum() / 12 ** 2
    g_plain, = torch.autograd.grad(plain * 3, fs)
    loss = fa_loss(fs, ft)
    g, = torch.autograd.grad(loss * 3, fs)  # an upstream gradient other than 1
    assert abs(loss.item() - plain.item()) < 1e-12 * plain.item()
    assert torch.allclose(g, g_plain, rtol=1e-10, atol=1e-14) and g.abs().max() > 0


def test_ffa_estimate_converges_to_its_expectation():
    """FFA (order 1) with v ~ N(0, I): E|(D v)_i| = sqrt(2/pi) ||D_i||_2, D = A_s - A_t, so the sketch tends to
    sqrt(2/pi) * (sum over rows of ||D_i||) / (HW)^2 as k grows."""
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)

    def unit(f):
        f = f.flatten(2)
        return f / (f.norm(dim=1, keepdim=True) + 1e-5)
    s, t = unit(fs), unit(ft)
    d = s.transpose(1, 2) @ s - t.transpose(1, 2) @ t
    expect = math.sqrt(2 / math.pi) * d.norm(dim=2).sum() / 36 ** 2
    errs = []
    for k in (15, 200, 8000):
        est = ffa_loss(fs, ft, k, torch.Generator().manual_seed(1))
        errs.append(abs(est.item() / expect.item() - 1))
    # relative std of a mean of k |N| is sqrt(pi/2 - 1)/sqrt(k), 0.8 % per row at k = 8000: 5 % is far outside
    assert errs[-1] < 0.05 and errs[-1] < errs[0]


def test_faqd_weight_projections():
    w = torch.tensor([0.5, -1.0, 0.1, -0.2, 2.0, 0.05])
    mean = w.abs().mean()  # 0.641667
    assert torch.allclose(project_weight(w, 1), torch.sign(w) * mean)
    # ternary: threshold 0.7 * mean = 0.449 keeps 0.5, -1.0, 2.0; scale = (0.5 + 1 + 2) / 6
    assert torch.allclose(project_weight(w, 2), torch.tensor([1.0, -1.0, 0, 0, 1.0, 0]) * 3.5 / 6)
    torch.manual_seed(0)
    w4 = torch.randn(500)
    q4 = project_weight(w4, 4)
    assert len(q4.unique()) <= 15
    delta = w4.abs().max() / 15
    codes = torch.sign(w4) * torch.round(w4.abs() / (2 * delta)).clamp(0, 7)  # integers in -7..7
    scale = (w4.abs() * codes.abs()).sum() / (codes ** 2).sum()
    assert torch.allclose(q4, codes * scale) and codes.abs().max() == 7
    # the scale is the least-squares one: the residual is orthogonal to the code pattern
    assert abs(((w4 - q4) * codes).sum().item()) < 1e-3


def test_faqd_quantized_relu_levels_and_gradients():
    q = FAQDReLU(2)
    with torch.no_grad():
        q.alpha.fill_(0.5)  # L = 3: levels 0, 0.5, 1.0, 1.5
    x = torch.tensor([-1.0, 0.0, 0.1, 0.5, 0.6, 1.0, 1.2, 5.0], requires_grad=True)
    out = q(x)
    assert torch.allclose(out, torch.tensor([0, 0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 0]))  # passes on 0 < x <= a L
    # 'mean' rule: 2^(b-1) = 2 for the 5 inputs inside, L = 3 for the one above: (10 + 3) * 0.01
    assert abs(q.alpha.grad.item() - 0.13) < 1e-6


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_faqd_relu_equals_the_reference_expression(bits):
    """FAQD's quantized ReLU is written without `where`: its output (sign of zero included) and input gradient equal
    the reference's expression bit for bit, the step's gradient to float rounding, on random inputs, the values
    around the two thresholds a(L-1) and aL, zeros, infinities, tiny and NaN inputs."""
    torch.manual_seed(bits)
    q = FAQDReLU(bits, rate=1e-7)  # small rate: the step's gradient stays inside its +-1 clamp
    a, L = q.alpha.detach().clamp(1e-3, 5), 2 ** bits - 1
    x = torch.randn(6000, dtype=torch.float32) * 3 * a * L
    edges = [float(v) for v in (a * (L - 1), a * L, a, 2 * a, -0.5 * a)]
    x[:9] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40, 1e-30, -1e-30])
    x[9:14] = torch.tensor(edges)
    for i, e in enumerate(edges[:2]):  # 1000 consecutive-ish floats across each threshold
        x[14 + 1000 * i:1014 + 1000 * i] = torch.linspace(e * (1 - 1e-5), e * (1 + 1e-5), 1000)
    x = x.view(10, 15, 8, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(10, 15, 8, 5)
    out = q(x)
    expect = torch.where(x > a * (L - 1), a * L, torch.ceil(x / a) * a)
    expect = torch.where(x > 0, expect, torch.zeros_like(expect))
    assert torch.equal(out, expect) and torch.equal(out.signbit(), expect.signbit())
    gx, ga = torch.autograd.grad(out, (x, q.alpha), g)
    inside = (x > 0) & (x <= a * L)
    assert torch.equal(gx, g * inside)
    g0 = torch.where(inside, 2.0 ** (bits - 1), torch.where(x > a * L, float(L), 0.0))
    assert torch.allclose(ga, (g * g0).sum().reshape(1) * 1e-7, rtol=1e-5, atol=0)


def test_discretise_levels_and_gradient_scaling():
    xn = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.9, 1.0], requires_grad=True)
    xq = discretise(xn, 2)  # grid k/3
    assert torch.allclose(xq, torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]))  # 0.5 * 3 = 1.5 rounds to even 2
    g = torch.tensor([1.0, -2.0, 1.0, 1.0, -1.0, 1.0])
    xq.backward(g)
    assert torch.equal(xn.grad, g)  # delta = 0: straight through
    xn.grad = None
    discretise(xn, 2, 0.5).backward(g)
    expect = g * (1 + 0.5 * torch.sign(g) * (xn.detach() - xq.detach()))
    assert torch.allclose(xn.grad, expect) and not torch.allclose(expect, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("delta", [0.0, 0.2])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unified_equals_the_plain_chain(bits, delta, dtype):
    """unified() is one autograd function: its values and its gradient to x equal bit for bit the plain chain
    discretise(clamp((x - lo) / (hi - lo), 0, 1)) through autograd, the gradients of lo and hi to float
    rounding; in both memory formats, with values on the grid's edges."""
    torch.manual_seed(bits)
    lo, hi = torch.tensor(-0.3, dtype=dtype), torch.tensor(1.7, dtype=dtype)
    x = torch.randn(6, 5, 4, 4, dtype=dtype) * 2
    x.view(-1)[:6] = torch.tensor([-0.3, 1.7, 0.0, -5.0, 5.0, 0.7], dtype=dtype)  # on lo, on hi, ...
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=fmt)
        g = torch.randn(6, 5, 4, 4, dtype=dtype)
        grads = []
        for fused in (False, True):
            xs, los, his = (t.clone().requires_grad_() for t in (x, lo, hi))
            out = unified(xs, los, his, bits, delta) if fused else \
                discretise(((xs - los) / (his - los)).clamp(0, 1), bits, delta)
            grads.append((out, *torch.autograd.grad(out, (xs, los, his), g)))
        (o0, gx0, glo0, ghi0), (o1, gx1, glo1, ghi1) = grads
        assert torch.equal(o0, o1) and torch.equal(gx0, gx1) and torch.equal(gx0.signbit(), gx1.signbit())
        assert gx1.is_contiguous(memory_format=fmt)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(glo1, glo0, rtol=tol, atol=tol) and torch.allclose(ghi1, ghi0, rtol=tol, atol=tol)
        assert glo0 != 0 and ghi0 != 0  # the ranges do get a gradient


def test_unified_gradient_on_the_edges_and_nan():
    """The range's edges (t = 0, t = 1) and values outside get no gradient to x; a NaN input propagates to the
    range's gradients, as through the plain chain (its own gradient, from masks that a NaN does not fail, is g / r
    where the chain's is 0: a NaN stops the run anyway)."""
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0, float("nan")], requires_grad=True)
    lo, hi = torch.tensor(0.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    out = unified(x, lo, hi, 2, 0.0)
    assert torch.equal(out[:5], torch.tensor([0.0, 0.0, 1 / 3, 1.0, 1.0])) and out[5].isnan()
    gx, glo, ghi = torch.autograd.grad(out, (x, lo, hi), torch.ones(6))
    assert torch.equal(gx[:5], torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]))  # 1 / (hi - lo) strictly inside only
    assert glo.isnan() and ghi.isnan()
    x2 = x.detach()[:5].requires_grad_()
    gx, glo, ghi = torch.autograd.grad(unified(x2, lo, hi, 2, 0.0), (x2, lo, hi), torch.ones(5))
    assert glo.item() == (0.25 - 1) / 2 and ghi.item() == -0.25 / 2  # t = 0.25 for the one input inside


@pytest.mark.parametrize("method", ["ewgs", "pact", "lsq", "dorefa"])
def test_unified_quantizers_levels_and_range_gradients(method):
    torch.manual_seed(0)
    conv = UQConv2d(4, 3, 3, padding=1, bias=False).setup_quant(method, 2, 2, 0.0)
    x = torch.relu(torch.randn(5, 4, 6, 6))
    conv.initialising = True
    conv(x)
    conv.initialising = False
    captured = {}
    orig = conv._conv_forward
    conv._conv_forward = lambda a, w, b: captured.update(a=a, w=w) or orig(a, w, b)
    y = conv(x)
    a_levels, w_levels = captured["a"].unique(), captured["w"].unique()
    assert len(a_levels) <= 4 and len(w_levels) <= 4 and a_levels.min() >= 0
    if method in ("ewgs", "dorefa"):
        assert w_levels.min() >= -1 - 1e-6 and w_levels.max() <= 1 + 1e-6
    y.sum().backward()
    assert conv.weight.grad.abs().sum() > 0
    learned = {"ewgs": ["lW", "uW", "uA", "scale"], "pact": ["uA"], "lsq": ["sW", "sA"], "dorefa": []}[method]
    for name in learned:
        assert getattr(conv, name).grad is not None and getattr(conv, name).grad.abs() > 0, name


def test_sqakd_initialisation_then_finite_first_step():
    teacher = random_teacher(10)
    args = SimpleNamespace(quantizer="ewgs", wbits=2, abits=2, delta=0.0, device="cpu")
    student = build_student(args, teacher)
    x = torch.randn(16, 3, 32, 32)
    initialise(student.train(), x)
    qconvs = [m for m in student.modules() if isinstance(m, UQConv2d)]
    assert len(qconvs) == 20 and not isinstance(student.conv1, UQConv2d)  # first conv and FC stay FP
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert all(m.uW > m.lW and m.uA > m.lA for m in qconvs)
    loss = kd_loss(student(x), teacher(x), 4.0)
    loss.backward()
    torch.optim.Adam(student.parameters(), 1e-3).step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("faqd.py", []),
                                          ("faqd.py", ["--fa-type", "ffa", "--wbits", "2", "--abits", "8"]),
                                          ("faqd.py", ["--memory-format", "contiguous"]),
                                          ("sqakd.py", []), ("sqakd.py", ["--quantizer", "lsq", "--delta", "0.2"])])
def test_smoke(script, extra, tiny_data, teachers, tmp_path):
    r = run_script([script, "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
                    "--run-name", "r", "--epochs", "2", "--batch-size", "8", "--train-subset", "32", *extra], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["epochs_done"] == 2 and s["calibrated_top1"] is not None and s["final_top1"] is not None
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(v) for k, v in rows[-1].items() if k.startswith("losses/"))
    assert rows[0]["charts/images_per_s"] > 0 and rows[0]["iteration"] == 4  # 32 images / batch 8


@pytest.mark.slow
@pytest.mark.parametrize("script,bits,msg", [("faqd.py", ["--wbits", "3"], "not supported by FAQD"),
                                             ("faqd.py", ["--wbits", "4", "--abits", "3"], "--abits 3"),
                                             ("sqakd.py", ["--wbits", "9"], "out of range")])
def test_bad_bits(script, bits, msg, tiny_data, teachers):
    r = run_script([script, "--data-dir", tiny_data, "--teacher", teachers["cifar10"], *bits], cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


def test_random_crop_pads_black_before_normalising():
    """Like torchvision's RandomCrop(32, padding=4) on the image: padded pixels are black, i.e. (0 - mean) / std
    after normalisation (not 0, the mean colour)."""
    from common import train_batches
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.manual_seed(0)
    out = next(train_batches(torch.full((64, 3, 32, 32), 255, dtype=torch.uint8), 64, mean, std, "cpu"))
    black = torch.tensor([(0 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    white = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    is_black, is_white = torch.isclose(out, black.expand_as(out)), torch.isclose(out, white.expand_as(out))
    assert bool((is_black | is_white).all()) and 0 < is_black.float().mean() < 0.25


def test_train_batches_keeps_the_last_partial_batch_only_when_asked():
    from common import train_batches
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    args = ((0.5,) * 3, (0.25,) * 3, "cpu")
    assert [len(b) for b in train_batches(x, 4, *args)] == [4, 4]
    torch.manual_seed(0)
    kept = list(train_batches(x, 4, *args, augment_images=False, drop_last=False))
    assert [len(b) for b in kept] == [4, 4, 2]
    seen = torch.cat(kept) * 0.25 + 0.5  # every image once, in some order
    assert torch.allclose(seen.sum(0), (x.float() / 255).sum(0), atol=1e-4)


def test_faqd_memory_format_only_changes_the_layout():
    """--memory-format contiguous (the reference's layout): the student's weights and the batches are contiguous,
    the same images in the same order, and the student computes the same function to float rounding."""
    from common import train_batches
    from faqd import build_student
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    args = ((0.5,) * 3, (0.25,) * 3, "cpu")
    torch.manual_seed(0)
    (cl,) = train_batches(x, 8, *args)
    torch.manual_seed(0)
    (nc,) = train_batches(x, 8, *args, memory_format=torch.contiguous_format)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert nc.is_contiguous() and torch.equal(cl, nc)
    teacher = random_teacher(10)
    a = SimpleNamespace(student_depth=20, teacher_depth=20, from_scratch=False, wbits=4, abits=8, float_acts=False,
                        alpha_rate=0.01, device="cpu")
    s_cl = build_student(SimpleNamespace(**vars(a), memory_format="channels_last"), teacher).eval()
    s_nc = build_student(SimpleNamespace(**vars(a), memory_format="contiguous"), teacher).eval()
    assert s_cl.conv1.weight.is_contiguous(memory_format=torch.channels_last) and s_nc.conv1.weight.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(s_cl.conv1(nc), s_nc.conv1(nc), atol=1e-5)


@pytest.mark.slow
def test_sqakd_last_batch_keep_trains_on_it(tiny_data, teachers, tmp_path):
    """--last-batch keep (the reference's DataLoader): 20 images at batch 8 make 3 steps an epoch, not 2."""
    for mode, steps in (("drop", 2), ("keep", 3)):
        r = run_script(["sqakd.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir",
                        str(tmp_path), "--run-name", mode, "--epochs", "2", "--train-subset", "20", "--batch-size", "8",
                        "--last-batch", mode, "--threads", "1"], cwd=ROOT)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert [row["iteration"] for row in rows] == [steps, 2 * steps]
        assert json.loads((tmp_path / mode / "summary.json").read_text())["protocol"]["iterations"] == 2 * steps
