"""LRQ's two borrowed components against their public code (LRQ itself has none): DKD (mdistiller's dkd_loss) and
the large-kernel attention block (VAN's Attention), forward and backward, contiguous and channels-last."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, fixture

import lrq


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sat", ["", "sat/"])
@pytest.mark.parametrize("setting", ["default", "res56_res20", "gdfq_t"])
@pytest.mark.parametrize("c", [10, 100])
def test_dkd_loss_and_gradient(c, setting, sat, dtype):
    """Against the reference run in float64 on the same inputs: to 1e-12 in float64. In float32 the bounds are the
    rounding's: TCKD (a KL over two bins of nearly equal distributions) loses up to 3e-3 of its value at T = 20,
    also in the reference's own float32 run (dkd_loss.pt), and by a different amount on another CPU."""
    inputs, ref = fixture("lrq", "dkd_loss.pt"), fixture("lrq", "dkd_loss_f64.pt")
    alpha, beta, T = inputs[f"setting/{setting}"].tolist()
    t = (inputs[f"c{c}/t_saturated"] if sat else inputs[f"c{c}/t"]).to(dtype)
    s = inputs[f"c{c}/s"].to(dtype).clone().requires_grad_(True)
    y = inputs[f"c{c}/y"]
    key = f"c{c}/{sat}{setting}"
    tol, tol_tckd = (1e-12, 1e-10) if dtype == torch.float64 else (1e-4, 1e-2)  # TCKD: fixtures README
    loss = lrq.dkd_loss(s, t, y, alpha, beta, T)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == dtype
    assert_close(loss, ref[f"{key}/loss"], tol, f"{key} loss")
    assert_close(s.grad, ref[f"{key}/grad_s"], tol, f"{key} grad")
    assert_close(lrq.dkd_loss(s, t, y, 1.0, 0.0, T), ref[f"{key}/tckd"], tol_tckd, f"{key} TCKD")
    assert_close(lrq.dkd_loss(s, t, y, 0.0, 1.0, T), ref[f"{key}/nckd"], tol, f"{key} NCKD")
    if dtype == torch.float32:  # the reference's own float32 values are within the same bounds of its float64 ones
        for what, bound in (("loss", tol), ("grad_s", tol), ("tckd", tol_tckd), ("nckd", tol)):
            assert_close(inputs[f"{key}/{what}"], ref[f"{key}/{what}"], bound, f"{key} {what}: float32 fixture")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", ["lka_c128_16x16.pt", "lka_c64_32x32.pt"])
def test_lka_block_forward_backward(name, memory_format):
    ref = fixture("lrq", name)
    block = lrq.LKABlock(int(ref["channels"]))
    block.load_state_dict({k[2:]: v for k, v in ref.items() if k.startswith("w/")})
    x = ref["x"].clone().contiguous(memory_format=memory_format).requires_grad_(True)
    y = block(x)
    (y * ref["r"]).sum().backward()
    assert_close(y, ref["y"], 1e-5, "output")
    assert_close(x.grad, ref["grad_x"], 1e-5, "grad x")
    for n, p in block.named_parameters():
        assert_close(p.grad, ref[f"grad_w/{n}"], 1e-5, f"grad {n}")


def test_dilated_depthwise_subgrid_equals_plain_dilated_conv():
    """Our CPU sub-grid formulation against PyTorch's own dilated depthwise conv (what CUDA runs)."""
    ref = fixture("lrq", "lka_c64_32x32.pt")
    conv = lrq.DilatedDepthwiseConv(64, 7, 3)
    conv.weight.data.copy_(ref["w/lka.dw_dilated.weight"])
    conv.bias.data.copy_(ref["w/lka.dw_dilated.bias"])
    x = ref["x"]
    assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=9, dilation=3, groups=64), 1e-6, "sub-grid")


def test_kl_path_matches_gdfq_student_loss():
    """`--kd kl`: GDFQ's KL('mean', T=20) + CE, checked against the GDFQ reference's student loss."""
    step, gen = fixture("gdfq", "student_step.pt"), fixture("gdfq", "generator.pt")
    t_logits = fixture("gdfq", "gen_loss.pt")["t_logits"]
    s = step["s_logits"]
    loss = lrq.kd_loss(s, t_logits, 20.0) + F.cross_entropy(s, gen["y"])
    assert_close(loss, step["loss_S"], 1e-5, "KL + CE")
