"""SQAKD against its reference code (kaiqi123/SQAKD): the unified (EWGS-form) quantized conv forward and backward at
1/2/4 bits with delta 0 and 0.2, its one-batch initialisation (one layer and a small network), the KL loss, and
MQBench's LSQ weight quantizer (the documented differences of --quantizer lsq)."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_close, fixture

import sqakd

SCALARS = {"lW": "lW", "uW": "uW", "lA": "lA", "uA": "uA", "output_scale": "scale"}  # reference -> ours


def uqconv(cin, cout, bits, delta=0.0, stride=1):
    return sqakd.UQConv2d(cin, cout, 3, stride, 1, bias=False).setup_quant("ewgs", bits, bits, delta)


@pytest.mark.parametrize("delta", ["0p0", "0p2"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantized_conv_forward_backward(bits, delta):
    ref = fixture("sqakd", f"qconv_ewgs_b{bits}_delta{delta}.pt")
    conv = uqconv(8, 6, bits, float(ref["delta"]))
    with torch.no_grad():
        conv.weight.copy_(ref["weight"])
        for theirs, ours in SCALARS.items():
            getattr(conv, ours).fill_(float(ref[theirs]))
    x = ref["x"].clone().requires_grad_(True)
    out = conv(x)
    out.backward(ref["grad_out"])
    assert_close(out, ref["out"], 1e-5, "output")
    with torch.no_grad():
        assert_close(2 * (sqakd.unified(conv.weight, conv.lW, conv.uW, bits, 0.0) - 0.5), ref["w_q"], 1e-5, "w_q")
        assert_close(sqakd.unified(ref["x"], conv.lA, conv.uA, bits, 0.0), ref["a_q"], 1e-5, "a_q")
    assert_close(x.grad, ref["grad_x"], 1e-5, "grad x")
    assert_close(conv.weight.grad, ref["grad_weight"], 1e-5, "grad weight")
    for theirs, ours in SCALARS.items():
        assert_close(getattr(conv, ours).grad, ref[f"grad_{theirs}"], 1e-5, f"grad {theirs}")


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_single_layer_initialisation(bits):
    ref = fixture("sqakd", "init_qconv.pt")
    conv = uqconv(8, 6, bits)
    conv.weight.data.copy_(ref["weight"])
    conv.init_ranges(ref["x"])
    for theirs, ours in SCALARS.items():
        assert_close(getattr(conv, ours).detach(), ref[f"b{bits}_{theirs}"], 1e-5, f"{theirs} after init")


@pytest.mark.parametrize("bits", [2, 4])
def test_network_initialisation_in_forward_order(bits):
    ref = fixture("sqakd", f"init_chain_b{bits}.pt")
    net = nn.Sequential(uqconv(8, 8, bits), nn.BatchNorm2d(8), nn.ReLU(), uqconv(8, 6, bits, stride=2),
                        nn.BatchNorm2d(6))
    with torch.no_grad():
        for i, conv in ((1, net[0]), (2, net[3])):
            conv.weight.copy_(ref[f"conv{i}_weight"])
        for i, bn in ((1, net[1]), (2, net[4])):
            bn.weight.copy_(ref[f"bn{i}_weight"])
            bn.bias.copy_(ref[f"bn{i}_bias"])
    sqakd.initialise(net.train(), ref["x"])
    for i, conv in ((1, net[0]), (2, net[3])):
        for theirs, ours in SCALARS.items():
            assert_close(getattr(conv, ours).detach(), ref[f"conv{i}_{theirs}"], 1e-5, f"conv{i} {theirs}")
    for i, bn in ((1, net[1]), (2, net[4])):
        assert_close(bn.running_mean, ref[f"bn{i}_running_mean"], 1e-5, f"bn{i} running mean")
        assert_close(bn.running_var, ref[f"bn{i}_running_var"], 1e-5, f"bn{i} running var")
    with torch.no_grad():
        assert_close(net.eval()(ref["x"]), ref["out_eval_after_init"], 1e-5, "network output after init")


@pytest.mark.parametrize("c", [10, 100])
def test_kd_loss(c):
    ref = fixture("sqakd", "kd_loss.pt")
    s = ref[f"c{c}_student"].clone().requires_grad_(True)
    loss = sqakd.kd_loss(s, ref[f"c{c}_teacher"], float(ref["T"]))
    loss.backward()
    assert_close(loss, ref[f"c{c}_loss"], 1e-5, "loss")
    assert_close(s.grad, ref[f"c{c}_grad_student"], 1e-5, "grad")


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_weights_against_mqbench(bits):
    """--quantizer lsq: the initial step and the forward match MQBench; its step gradient matches without MQBench's
    1/sqrt(N Qp) gradient scale, which ours lacks (documented); at 2 bits MQBench's builtin masks the gradient on
    the rounded code, ours (as the LSQ paper) on the unrounded value."""
    ref = fixture("sqakd", "lsq_mqbench_weight.pt")
    w = ref["weight"]
    conv = sqakd.UQConv2d(8, 6, 3, 1, 1, bias=False).setup_quant("lsq", bits, bits, 0.0)
    conv.weight.data.copy_(w)
    conv.init_ranges(torch.rand(2, 8, 6, 6))
    for mode in ("gradscale", "nogradscale"):
        assert_close(conv.sW.detach(), ref[f"b{bits}_{mode}_init_step"], 1e-6, f"{mode} initial step")
    step = torch.tensor(float(ref[f"b{bits}_nogradscale_step"]), requires_grad=True)
    wq = w.clone().requires_grad_(True)
    lo, hi = -(2 ** (bits - 1)) * step, (2 ** (bits - 1) - 1) * step
    out = sqakd.unified(wq, lo, hi, bits, 0.0) * (hi - lo) + lo
    out.backward(ref["grad_out"])
    assert_close(out, ref[f"b{bits}_nogradscale_out"], 1e-5, "forward")
    if bits == 4:
        assert_close(step.grad.reshape(1), ref["b4_nogradscale_grad_step"], 1e-5, "step gradient")
        scale = 1 / math.sqrt(w.numel() * (2 ** (bits - 1) - 1))
        assert_close(step.grad.reshape(1) * scale, ref["b4_gradscale_grad_step"], 1e-4, "scaled step gradient")
        assert_close(wq.grad, ref["b4_nogradscale_grad_weight"], 1e-5, "weight gradient")
    else:
        theirs = ref["b2_nogradscale_grad_weight"]
        differ = (wq.grad - theirs).abs() > 1e-5 * theirs.abs().max()
        assert differ.sum() == 8  # the fixture README: 8 of 432 weights, within half a step above the range
        code = (w / step).detach()[differ]
        assert bool(((code > 2 ** (bits - 1) - 1) & (code <= 2 ** (bits - 1) - 0.5)).all())
        assert bool((wq.grad[differ] == 0).all())
