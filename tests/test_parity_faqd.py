"""FAQD against its reference code (lzj994/FAQD): feature affinity and its fast sketch (same size and resized), the
1/2/4-bit weight projections and the projected conv, the learnable-step quantized ReLU, the logit losses; and the
reference's effective training of the step (never updated), reproduced by --alpha-mode frozen."""
import json

import pytest
import torch
from conftest import ROOT, assert_close, fixture, run_script

import faqd


@pytest.mark.parametrize("case", ["same", "resize"])
def test_feature_affinity(case):
    ref = fixture("faqd", "fa_loss.pt")
    fs = ref[f"{case}_fs"].clone().requires_grad_(True)
    loss = faqd.fa_loss(fs, ref[f"{case}_ft"])  # resizes with align_corners=True, as the reference
    loss.backward()
    assert_close(loss, ref[f"{case}_loss"], 1e-5, "FA loss")
    assert_close(fs.grad, ref[f"{case}_grad_fs"], 1e-5, "FA gradient")


@pytest.mark.parametrize("case", ["same", "resize"])
def test_fast_feature_affinity(case):
    ref = fixture("faqd", "ffa_loss.pt")
    fs = ref[f"{case}_fs"].clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(int(ref["seed"]))  # our one call draws the reference's V
    assert torch.equal(torch.randn(fs.shape[-2] * fs.shape[-1], int(ref["dim"]),
                                   generator=torch.Generator().manual_seed(1)), ref[f"{case}_V"])
    loss = faqd.ffa_loss(fs, ref[f"{case}_ft"], int(ref["dim"]), gen)
    loss.backward()
    assert_close(loss, ref[f"{case}_loss"], 2e-5, "FFA loss")  # ours adds 1e-5 to the norms, the reference not
    assert_close(fs.grad, ref[f"{case}_grad_fs"], 2e-5, "FFA gradient")


def test_fast_feature_affinity_is_finite_at_an_all_zero_position():
    """The reference's FFA divides 0 by 0 there (NaN); ours keeps FA's +1e-5 (documented deviation)."""
    ref = fixture("faqd", "ffa_loss.pt")
    assert torch.isnan(torch.as_tensor(ref["zero_position_loss"]))
    fs, ft = ref["same_fs"].clone(), ref["same_ft"]
    fs[0, :, 0, 0] = 0
    assert torch.isfinite(faqd.ffa_loss(fs, ft, 15, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_projection_and_projected_conv(bits):
    ref = fixture("faqd", "weight_proj.pt")
    proj = faqd.project_weight(ref["weight"], bits)
    assert torch.equal(proj, ref[f"b{bits}_proj"])
    assert torch.equal(proj, ref[f"b{bits}_scale"] * ref[f"b{bits}_codes"].to(proj.dtype))
    conv = faqd.ProjConv2d(8, 16, 3, 1, 1, bias=False)
    conv.wbits = bits
    conv.weight.data.copy_(ref["weight"])
    x = ref["x"].clone().requires_grad_(True)
    out = conv(x)
    out.backward(ref["grad_out"])
    assert_close(out, ref[f"b{bits}_conv_out"], 1e-5, "conv output")
    assert_close(conv.weight.grad, ref[f"b{bits}_conv_grad_weight"], 1e-5, "weight gradient (at the projection)")
    assert_close(x.grad, ref[f"b{bits}_conv_grad_x"], 1e-5, "input gradient")


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("tag", ["b1", "b2", "b4", "b4_alpha0p3"])
def test_quantized_relu(tag, size):
    ref = fixture("faqd", "qrelu.pt")
    relu = faqd.FAQDReLU(int(ref[f"{tag}_bits"]), float(ref["rate"]))
    relu.alpha.data.fill_(float(ref[f"{tag}_alpha"]))
    x = ref[f"{tag}_x"].clone().requires_grad_(True)
    out = relu(x)
    out.backward(ref[f"{tag}_grad_out_{size}"])
    assert torch.equal(out, ref[f"{tag}_out"])
    assert torch.equal(x.grad, ref[f"{tag}_grad_x_{size}"])
    assert_close(relu.alpha.grad, ref[f"{tag}_grad_alpha_{size}"], 1e-5, "step gradient")


def test_initial_steps_are_the_reference_values():
    ref = fixture("faqd", "qrelu.pt")
    for bits in (1, 2, 4):
        assert faqd.FAQDReLU(bits).alpha.item() == float(ref[f"b{bits}_alpha"])


def test_logit_losses():
    ref = fixture("faqd", "kd_loss.pt")
    for kind, key in (("mse", "mse"), ("kl", "kl")):
        s = ref["student"].clone().requires_grad_(True)
        loss = faqd.kd_loss(s, ref["teacher"], kind, float(ref["T"]))
        loss.backward()
        assert_close(loss, ref[f"{key}_loss"], 1e-5, f"{kind} loss")
        assert_close(s.grad, ref[f"{key}_grad_student"], 1e-5, f"{kind} gradient")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "learned"])
def test_alpha_mode_end_to_end(mode, tiny_data, teachers, tmp_path):
    """The reference never updates its steps (none receives a gradient: 10 steps, 0 with a gradient);
    --alpha-mode frozen reproduces that through a whole run, learned moves them."""
    ref = fixture("faqd", "qrelu.pt")
    assert int(ref["official_resnet20_alphas"]) == 10 and int(ref["official_resnet20_alphas_with_grad"]) == 0
    r = run_script(["faqd.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
                    "--run-name", mode, "--epochs", "1", "--train-subset", "32", "--batch-size", "8", "--threads", "1",
                    "--wbits", "4", "--abits", "4", "--alpha-mode", mode, "--lr", "0.5", "--save-model"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / mode / "model.pt", weights_only=True)["state_dict"]
    alphas = [v.item() for k, v in sd.items() if k.endswith("alpha")]
    assert len(alphas) == 19
    moved = sum(a != faqd.FAQDReLU(4).alpha.item() for a in alphas)
    assert moved == (0 if mode == "frozen" else 19)
    assert json.loads((tmp_path / mode / "args.json").read_text())["alpha_mode"] == mode
