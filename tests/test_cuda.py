"""On a GPU: every script end to end for two tiny epochs on `cuda`, and the reference fixtures re-checked on the
device with TF32 off (GDFQ's student step, AIT's batched GI step, AKT's full student step, the LKA block, SQAKD's
quantized conv, FAQD's feature affinity). Skipped when CUDA is absent; CI is CPU-only."""
import json

import pytest
import torch
from conftest import ROOT, assert_close, fixture, frozen_student, parity_teacher, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


GEN = ["--epochs", "2", "--warmup-epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8",
       "--milestones-from", "train"]
REAL = ["--epochs", "2", "--train-subset", "16", "--batch-size", "8"]
SYN = ["--num-images", "8", "--syn-batch", "4", "--syn-iters", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("gdfq.py", GEN), ("ait.py", GEN), ("akt.py", GEN),
                                          ("akt.py", GEN + ["--base", "gdfq"]), ("lrq.py", GEN),
                                          ("faqd.py", REAL), ("faqd.py", REAL + ["--fa-type", "ffa"]),
                                          ("sqakd.py", REAL),
                                          ("synq.py", GEN + SYN)])
def test_script_end_to_end_on_cuda(script, extra, tiny_data, teachers, tmp_path):
    r = run_script([script, "--device", "cuda", "--data-dir", tiny_data, "--teacher", teachers["cifar10"],
                    "--out-dir", str(tmp_path), "--run-name", "r", *extra], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["epochs_done"] == 2 and s["final_top1"] is not None and s["args"]["device"] == "cuda"
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("charts/gi_s_per_iter" not in row for row in rows)  # host time cannot measure asynchronous GPU work


def test_gdfq_student_step_on_cuda():
    import gdfq
    ref, gen = fixture("gdfq", "student_step.pt"), fixture("gdfq", "generator.pt")
    t_logits = fixture("gdfq", "gen_loss.pt")["t_logits"].cuda()
    student = frozen_student(parity_teacher().cuda(), ref["act_lo"], ref["act_hi"])
    s = student(gen["images"].cuda())
    loss = gdfq.student_loss(s, t_logits, gen["y"].cuda(), 20.0)
    loss.backward()
    assert_close(s.cpu(), ref["s_logits"], 1e-5, "student logits")
    assert_close(loss.cpu(), ref["loss_S"], 1e-5, "loss")
    for n, p in student.named_parameters():
        assert_close(p.grad.norm().cpu(), ref[f"grad_norm/{n}"], 1e-4, f"grad norm {n}")


def test_ait_batched_gi_step_on_cuda():
    from ait import GradientInundation
    ref = fixture("ait", "gi_step1.pt")
    names = ref["qnames"].split(",") if isinstance(ref["qnames"], str) else list(ref["qnames"])
    sd = parity_teacher().state_dict()
    params = [torch.nn.Parameter(sd[n].clone().cuda()) for n in names]
    opt = GradientInundation(params, lr=1e-4, wbits=4, threshold=1e-3, momentum=0.9)  # auto: batched on CUDA
    for p, n in zip(params, names):
        p.grad = ref[f"grad1/{n}"].cuda()
    opt.step()
    assert [float(a) for a in opt.last_alphas] == ref["uncapped/alphas"].tolist()
    for p, n in zip(params, names):
        if f"uncapped/after/{n}" in ref:
            assert_close(p.detach().cpu(), ref[f"uncapped/after/{n}"], 1e-6, n)


def test_akt_student_step_on_cuda():
    import akt
    ref, gen = fixture("akt", "akt_student_step.pt"), fixture("akt", "adadfq_gen_step.pt")
    teacher = parity_teacher().cuda()
    student = frozen_student(teacher, gen["act_lo"], gen["act_hi"])
    images = gen["images"].cuda()
    with torch.no_grad():
        t_logits, t_feats = akt.ResidualBranches(teacher)(teacher, images)
    s_logits, s_feats = akt.ResidualBranches(student)(student, images)
    loss = akt.adadfq_student_loss(t_logits, s_logits, 20.0, 400.0) + 1000.0 * akt.rfd_loss(s_feats, t_feats, 8.0)
    loss.backward()
    assert_close(loss.cpu(), ref["loss_S"], 1e-5, "loss_S")
    for n, p in student.named_parameters():
        assert_close(p.grad.norm().cpu(), ref[f"grad_norm/{n}"], 1e-3, f"grad norm {n}")


def test_lka_block_on_cuda():
    import lrq
    ref = fixture("lrq", "lka_c64_32x32.pt")
    block = lrq.LKABlock(64).cuda()
    block.load_state_dict({k[2:]: v for k, v in ref.items() if k.startswith("w/")})
    x = ref["x"].cuda().requires_grad_(True)
    y = block(x)  # CUDA runs the plain dilated conv
    (y * ref["r"].cuda()).sum().backward()
    assert_close(y.detach().cpu(), ref["y"], 1e-5, "output")
    assert_close(x.grad.cpu(), ref["grad_x"], 1e-5, "grad x")


def test_sqakd_quantized_conv_on_cuda():
    import sqakd
    ref = fixture("sqakd", "qconv_ewgs_b2_delta0p2.pt")
    conv = sqakd.UQConv2d(8, 6, 3, 1, 1, bias=False).setup_quant("ewgs", 2, 2, float(ref["delta"])).cuda()
    with torch.no_grad():
        conv.weight.copy_(ref["weight"])
        for theirs, ours in {"lW": "lW", "uW": "uW", "lA": "lA", "uA": "uA", "output_scale": "scale"}.items():
            getattr(conv, ours).fill_(float(ref[theirs]))
    x = ref["x"].cuda().requires_grad_(True)
    out = conv(x)
    out.backward(ref["grad_out"].cuda())
    assert_close(out.detach().cpu(), ref["out"], 1e-5, "output")
    assert_close(conv.weight.grad.cpu(), ref["grad_weight"], 1e-5, "grad weight")


def test_faqd_feature_affinity_on_cuda():
    import faqd
    ref = fixture("faqd", "fa_loss.pt")
    fs = ref["resize_fs"].cuda().requires_grad_(True)
    loss = faqd.fa_loss(fs, ref["resize_ft"].cuda())
    loss.backward()
    assert_close(loss.detach().cpu(), ref["resize_loss"], 1e-5, "FA loss")
    assert_close(fs.grad.cpu(), ref["resize_grad_fs"], 1e-5, "FA gradient")
