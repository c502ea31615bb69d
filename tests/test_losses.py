"""GDFQ's losses against hand computations."""
import math

import torch
import torch.nn as nn

from gdfq import BNStatsLoss, Generator, kd_loss, student_loss


def test_bns_loss_hand_value():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    teacher = nn.Sequential(bn)
    loss = BNStatsLoss(teacher)
    # channel 0 holds 1, 2, 3, 4 (mean 2.5, biased var 1.25); channel 1 holds 0, 0, 2, -2 (mean 0, var 2)
    x = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]], [[[3.0, 4.0]], [[2.0, -2.0]]]], requires_grad=True)
    loss.active = True
    teacher(x)
    value = loss()
    # MSE(mean) = ((2.5-0.5)^2 + (0+1)^2)/2 = 2.5; MSE(var) = ((1.25-2)^2 + (2-0.5)^2)/2 = 1.40625
    assert abs(value.item() - 3.90625) < 1e-5
    value.backward()
    assert x.grad is not None and loss.stats == []
    loss.active = False
    teacher(x)
    assert loss.stats == []  # hooks record only while active


def test_bns_loss_averages_layers_and_matches_var_mean():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                            nn.BatchNorm2d(5)).eval()
    for m in teacher:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(6, 3, 9, 9) * 3 + 1
    loss = BNStatsLoss(teacher)
    loss.active = True
    teacher(x)
    got = loss()
    expect, h = 0.0, x
    for m in teacher:
        if isinstance(m, nn.BatchNorm2d):
            var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
            expect += ((mean - m.running_mean) ** 2).mean() + ((var - m.running_var) ** 2).mean()
        h = m(h)
    assert torch.allclose(got, expect / 2, rtol=1e-4)


def test_kd_loss_hand_value():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    T = 2.0
    total = 0.0
    for si, ti in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / T) for v in si)
        zt = sum(math.exp(v / T) for v in ti)
        for a, b in zip(si, ti):
            pt, ps = math.exp(b / T) / zt, math.exp(a / T) / zs
            total += pt * (math.log(pt) - math.log(ps))
    # reference 'mean' reduction divides by B*C = 6, times T^2
    assert abs(kd_loss(s, t, T).item() - total / 6 * T * T) < 1e-5
    assert abs(kd_loss(s, t, T, "batchmean").item() - total / 2 * T * T) < 1e-5
    assert kd_loss(t, t, T).abs().item() < 1e-7


def test_student_loss_is_kd_plus_weighted_ce():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    # CE by hand: mean over the batch of log(sum exp) - logit of the label
    ce = sum(math.log(sum(math.exp(v) for v in row)) - row[k] for row, k in zip(s.tolist(), y.tolist())) / 2
    kd = kd_loss(s, t, 20.0).item()
    assert abs(student_loss(s, t, y, 20.0).item() - (kd + ce)) < 1e-5  # the paper: weight 1
    assert abs(student_loss(s, t, y, 20.0, ce_weight=0.5).item() - (kd + 0.5 * ce)) < 1e-5
    assert abs(student_loss(s, t, y, 20.0, ce_weight=0.0).item() - kd) < 1e-7  # --ce-weight 0: KD only


def test_generator_shapes_and_output_standardised():
    torch.manual_seed(0)
    g = Generator(10).train()
    x = g(torch.randn(16, 100), torch.randint(0, 10, (16,)))
    assert x.shape == (16, 3, 32, 32)
    # last layer is BN(3, affine=False) in train mode: per-channel mean 0, var ~1
    assert x.mean((0, 2, 3)).abs().max() < 1e-4
    assert ((x.var((0, 2, 3), unbiased=False) - 1).abs() < 1e-2).all()
    assert g.block1[1].eps == 0.8 and g.block2[1].eps == 0.8  # the reference's positional-eps quirk


def test_batch_stats_values_and_one_pass_gradient():
    """common.batch_stats: the values of the step-by-step expression bit for bit; its one-pass gradient against
    autograd through that expression (float64), for a loss on the means only, the variances only and both."""
    from common import batch_stats

    def expression(x, c):
        xc = x - c.view(1, -1, 1, 1)
        d = xc.mean((0, 2, 3))
        return d + c, (xc * xc).mean((0, 2, 3)) - d * d
    torch.manual_seed(0)
    x32 = (torch.randn(6, 3, 5, 4) * 2 + 1).contiguous(memory_format=torch.channels_last)
    c32 = torch.tensor([0.9, -0.2, 1.5])
    assert all(torch.equal(a, b) for a, b in zip(batch_stats(x32, c32), expression(x32, c32)))
    mean, var = batch_stats(x32.double(), c32.double())
    assert torch.allclose(var, x32.double().var((0, 2, 3), unbiased=False))
    assert torch.allclose(mean, x32.double().mean((0, 2, 3)))
    x, c = x32.double().requires_grad_(True), c32.double()
    w_m, w_v = torch.tensor([1.0, -2.0, 0.5]).double(), torch.tensor([0.3, 1.0, -4.0]).double()
    for use in ("mean", "var", "both"):
        losses = []
        for m, v in (batch_stats(x, c), expression(x, c)):
            losses.append((m * w_m).sum() * (use != "var") + ((v - 1) ** 2 * w_v).sum() * (use != "mean"))
        g, g_ref = (torch.autograd.grad(loss, x)[0] for loss in losses)
        assert torch.allclose(g, g_ref, rtol=1e-12, atol=1e-15) and g.abs().max() > 0
