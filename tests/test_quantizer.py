"""The ZeroQ quantizer: exact levels, zero point, clamping, STE gradient, per-channel ranges, EMA calibration, and
QuantReLU's one-function ReLU + quantizer against the two-step chain."""
import pytest
import torch
import torch.nn.functional as F

from common import (CifarResNet, QConv2d, QLinear, QuantReLU, evaluate, fake_quant, quantize_model, relu_fake_quant,
                    scale_zero, set_calibrating, weight_codes)


def test_fake_quant_hand_values():
    # k=2, [lo, hi] = [-0.5, 1.0]: s = 3 / 1.5 = 2, z = round(-1) + 2 = 1, levels (q + 1) / 2 for q in -2..1
    x = torch.tensor([-1.0, -0.5, -0.2, 0.1, 0.3, 0.74, 1.0, 3.0])
    # 2x - 1 = [-3, -2, -1.4, -0.8, -0.4, 0.48, 1, 5] -> round -> clamp(-2, 1) -> [-2, -2, -1, -1, 0, 0, 1, 1]
    expect = torch.tensor([-0.5, -0.5, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    assert torch.equal(fake_quant(x, torch.tensor(-0.5), torch.tensor(1.0), 2), expect)


def test_fake_quant_zero_point_rounding_as_zeroq():
    # [lo, hi] = [-1, 1], k=2: s = 1.5, z = round(-1.5) + 2 = 0 (half to even): the grid is {-2,-1,0,1}/1.5,
    # so hi = 1 clamps to 2/3 and lo = -1 rounds to -4/3. That is ZeroQ's formula, reproduced exactly.
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.5, 1.0, 2.0])
    out = fake_quant(x, torch.tensor(-1.0), torch.tensor(1.0), 2)
    assert torch.allclose(out, torch.tensor([-2, -2, -1, 0, 0, 1, 1, 1]) / 1.5)


def test_fake_quant_unsigned_activation_grid():
    # post-ReLU range [0, 1.5], 3 bits: 8 levels j * 1.5 / 7, j = 0..7; values above hi clamp to hi
    x = torch.linspace(0, 2, 101)
    out = fake_quant(x, torch.tensor(0.0), torch.tensor(1.5), 3)
    levels = torch.arange(8) * 1.5 / 7
    assert torch.allclose(out, levels[(x * 7 / 1.5).round().clamp(0, 7).long()], atol=1e-6)
    assert len(out.unique()) == 8 and abs(out.max().item() - 1.5) < 1e-6


def test_fake_quant_degenerate_range_is_finite():
    out = fake_quant(torch.zeros(4), torch.tensor(0.0), torch.tensor(0.0), 4)
    assert torch.isfinite(out).all()


def test_ste_is_identity_everywhere():
    x = torch.tensor([-5.0, -0.3, 0.2, 0.9, 7.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    fake_quant(x, torch.tensor(-0.5), torch.tensor(1.0), 4).backward(g)
    assert torch.equal(x.grad, g)  # no mask outside [lo, hi]


def test_per_channel_weight_quant_matches_loop_reference():
    torch.manual_seed(0)
    conv = QConv2d(3, 4, 3, padding=1, bias=False)
    conv.wbits = 3
    conv.weight.data[1] *= 10  # channels with very different ranges
    conv.weight.data[2] = conv.weight.data[2].abs() + 0.1  # all-positive channel
    w = conv.weight.detach()
    wq = torch.empty_like(w)
    for c in range(4):  # independent per-channel reference, one channel at a time
        lo, hi = w[c].min(), w[c].max()
        s = 7 / (hi - lo)
        z = torch.round(s * lo) + 4
        wq[c] = (torch.clamp(torch.round(s * w[c] - z), -4, 3) + z) / s
        assert len(wq[c].unique()) <= 8
        assert abs(wq[c].max() - hi) <= 0.5 / s + 1e-6 and abs(wq[c].min() - lo) <= 0.5 / s + 1e-6
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, wq, padding=1), atol=1e-5)
    codes = weight_codes(w, 3)
    assert codes.min() >= -4 and codes.max() <= 3 and codes.shape == (4, 27)


def test_qlinear_per_row_and_gradient_reaches_float_weight():
    lin = QLinear(5, 3)
    lin.wbits = 2
    x = torch.randn(4, 5)
    lin(x).sum().backward()
    # identity STE: dL/dW = sum_b x_b for every row, as for a float linear layer
    assert torch.allclose(lin.weight.grad, x.sum(0).expand(3, 5))


def test_ema_calibration_and_freeze():
    q = QuantReLU(4)
    q(torch.tensor([-1.0, 0.0, 2.0]))  # first update takes the batch value (no bias correction)
    assert q.lo.item() == 0.0 and q.hi.item() == 2.0
    q(torch.tensor([0.5, 4.0]))  # hi = 0.9 * 2 + 0.1 * 4 = 2.2, lo = 0.9 * 0 + 0.1 * 0.5 = 0.05
    assert abs(q.hi.item() - 2.2) < 1e-6 and abs(q.lo.item() - 0.05) < 1e-6
    q.calibrating = False
    out = q(torch.tensor([100.0, -3.0]))
    assert abs(q.hi.item() - 2.2) < 1e-6 and abs(q.lo.item() - 0.05) < 1e-6  # frozen
    # s = 15 / 2.15, z = round(s * 0.05) + 8 = 8: the grid is j / s, j = 0..15, so 100 clamps to 15 / s = 2.15
    assert abs(out[0].item() - 2.15) < 1e-5 and out[1].item() == 0.0


def test_quantize_model_structure_and_calibration_switch():
    torch.manual_seed(0)
    fp = CifarResNet(20, 10).eval()
    q = quantize_model(fp, 4, 3)
    mods = list(q.modules())
    assert sum(isinstance(m, QuantReLU) for m in mods) == 19
    assert sum(isinstance(m, QConv2d) for m in mods) == 21 and sum(isinstance(m, QLinear) for m in mods) == 1
    assert all(m.wbits == 4 for m in mods if isinstance(m, (QConv2d, QLinear)))
    assert all(m.abits == 3 for m in mods if isinstance(m, QuantReLU))
    assert not any(isinstance(m, torch.nn.Conv2d) and not isinstance(m, QConv2d) for m in mods)
    assert torch.equal(q.conv1.weight, fp.conv1.weight)  # same float shadow weights
    x = torch.randn(8, 3, 32, 32)
    q(x)
    ranges = [m.hi.item() for m in mods if isinstance(m, QuantReLU)]
    assert all(r > 0 for r in ranges)
    set_calibrating(q, False)
    q(5 * x)
    assert ranges == [m.hi.item() for m in mods if isinstance(m, QuantReLU)]
    # evaluation never moves ranges, even while calibrating
    set_calibrating(q, True)
    evaluate(q, 3 * x, torch.zeros(8, dtype=torch.long))
    assert ranges == [m.hi.item() for m in mods if isinstance(m, QuantReLU)]


def test_8bit_student_tracks_float_model():
    torch.manual_seed(0)
    fp = CifarResNet(20, 10).eval()
    q = quantize_model(fp, 8, 8).eval()
    x = torch.randn(16, 3, 32, 32)
    q(x)  # calibrate
    set_calibrating(q, False)
    ref, out = fp(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    q2 = quantize_model(fp, 2, 2).eval()
    q2(x)
    set_calibrating(q2, False)
    assert (q2(x) - ref).abs().max() > (out - ref).abs().max()  # fewer bits, larger error


def _two_step(x, lo, hi, k, six):
    return fake_quant(F.relu6(x) if six else F.relu(x), lo, hi, k)


@pytest.mark.parametrize("six", [False, True])
def test_relu_fake_quant_is_the_two_step_chain_bit_for_bit(six):
    """QuantReLU's one-function ReLU + fake quantization against relu (relu6) then fake_quant: values and gradients
    equal bit for bit, over bit widths, scales, ranges with lo < 0 and odd zero points, exact rounding ties, the
    boundaries 0 and 6, signed zero, NaN and inf."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(120):
        k = (2, 3, 4, 8)[trial % 4]
        lo = torch.zeros(()) if trial % 5 == 0 else torch.empty(()).uniform_(-1.0, 1.0, generator=gen)
        hi = lo + torch.empty(()).uniform_(1e-3, 8.0, generator=gen)
        x = torch.randn(32, 4, 3, 3, generator=gen) * (0.1, 1.0, 3.0, 10.0)[trial % 4]
        if trial % 7 == 0:  # x * s exactly on half steps: rounding ties everywhere
            s, _ = scale_zero(lo, hi, k)
            x = torch.randint(-40, 40, x.shape, generator=gen).float() / 2 / s
        x.view(-1)[:6] = torch.tensor([0.0, -0.0, 6.0, float("nan"), float("inf"), -float("inf")])
        x.requires_grad_(True)
        g = torch.randn(x.shape, generator=gen)
        ref = _two_step(x, lo, hi, k, six)
        out = relu_fake_quant(x, lo, hi, k, six)
        assert torch.equal(ref.nan_to_num(7.0), out.nan_to_num(7.0)) and torch.equal(ref.isnan(), out.isnan())
        assert torch.equal(torch.autograd.grad(ref, x, g)[0], torch.autograd.grad(out, x, g)[0])


@pytest.mark.parametrize("six", [False, True])
def test_quant_relu_calibrates_and_quantizes_as_relu_then_fake_quant(six):
    torch.manual_seed(0)
    q = QuantReLU(3, six=six)
    lo, hi = torch.zeros(()), torch.zeros(())
    for step, scale in enumerate((1.0, 9.0, 0.5)):  # ranges across 6 (relu6 clips them) and below 0
        x = (torch.randn(8, 4, 5, 5) * scale - 0.5).requires_grad_(True)
        a = F.relu6(x) if six else F.relu(x)
        m = torch.tensor(0.0 if step == 0 else 0.9)  # float32, as the module's EMA
        lo, hi = m * lo + (1 - m) * a.detach().min(), m * hi + (1 - m) * a.detach().max()
        out = q(x)
        assert torch.equal(q.lo, lo) and torch.equal(q.hi, hi)
        assert torch.equal(out, fake_quant(a, lo, hi, 3))
        g = torch.randn_like(out)
        assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(a, x, g)[0])
