"""--amp bf16 and --compile (common.accelerate): what stays float32, what runs in bf16, the traceable upsampling
path torch.compile uses, the fallback when compile is unavailable, and compiled steps against eager ones."""
import copy
import json
import os
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT, run_script
from test_gdfq_cli import TINY

import common
from common import QuantReLU, accelerate, quantize_model, set_calibrating
from gdfq import BNStatsLoss, Generator, student_loss


def flags(**kw):
    return types.SimpleNamespace(**{"device": "cpu", "compile": False, "amp": "off", **kw})


def gdfq_models(seed=0):
    torch.manual_seed(seed)
    teacher = common.CifarResNet(20, 10).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    student = quantize_model(teacher, 4, 4).requires_grad_(True).eval()
    gen = Generator(10).train()
    return teacher, student, gen


def gdfq_step(teacher, student, gen, bns, z, y, calibrate=False):
    """One GDFQ iteration's losses (no optimizer step): generator loss and student loss."""
    set_calibrating(student, calibrate)
    x = gen(z, y)
    bns.active = True
    t = teacher(x)
    bns.active = False
    stats = [(m, v) for _, m, v in bns.stats]
    loss_g = F.cross_entropy(t, y) + 0.1 * bns()
    s = student(x.detach())
    return x, t, s, stats, loss_g, student_loss(s, t.detach(), y, 20.0)


def test_amp_bf16_runs_convolutions_in_bf16_and_keeps_quantizers_statistics_and_losses_float32():
    z, y = torch.randn(8, 100), torch.randint(0, 10, (8,))
    ref = gdfq_models()
    ref_out = gdfq_step(*ref, BNStatsLoss(ref[0]), z, y, calibrate=True)
    teacher, student, gen = gdfq_models()
    bns = BNStatsLoss(teacher)
    conv_dtypes, relu_in = [], []
    student.conv1.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    teacher.layer1[0].conv1.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    qrelu = next(m for m in student.modules() if isinstance(m, QuantReLU))
    qrelu.register_forward_pre_hook(lambda m, i: relu_in.append(i[0].dtype))
    accelerate(flags(amp="bf16"), teacher, student, gen)
    x, t, s, stats, loss_g, loss_s = gdfq_step(teacher, student, gen, bns, z, y, calibrate=True)
    assert conv_dtypes == [torch.bfloat16, torch.bfloat16]  # the convolutions ran in bf16 ...
    assert relu_in == [torch.bfloat16]  # ... so the quantizer's input arrives in bf16, and is cast up:
    assert all(t_.dtype == torch.float32 for t_ in (x, t, s, loss_g, loss_s, qrelu.lo, qrelu.hi))
    assert all(m.dtype == torch.float32 and v.dtype == torch.float32 for m, v in stats)
    # bf16 rounding, not another computation: close to float32, and not equal to it
    for a, b in ((loss_g, ref_out[4]), (loss_s, ref_out[5]), (t, ref_out[1])):
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    assert all(k in dict(student.state_dict()) for k in dict(ref[1].state_dict()))  # checkpoints unchanged
    (loss_g + loss_s).backward()
    assert all(p.grad.dtype == torch.float32 for p in gen.parameters())


def test_compile_unavailable_says_so_and_runs_eager(monkeypatch, capsys):
    monkeypatch.setattr(common, "_compile_available", lambda device: "RuntimeError: no C++ compiler found")
    m, a = nn.Linear(2, 2), flags(compile=True)
    accelerate(a, m)
    out = capsys.readouterr().out
    assert out == ("warning: --compile is unavailable here (RuntimeError: no C++ compiler found); running eager, "
                   "results are the same\n")
    assert a.compile is False and m._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_steps_match_eager_to_float_rounding():
    """Three GDFQ iterations (generator Adam step, student SGD step) compiled and eager from the same weights and
    inputs: the first iteration's losses agree to float rounding; later ones drift only by rounding amplified
    through Adam's first, nearly sign-like steps."""
    eager = gdfq_models()
    comp = [copy.deepcopy(m) for m in eager]
    losses = []
    for models, on in ((eager, False), (comp, True)):
        teacher, student, gen = models
        bns = BNStatsLoss(teacher)
        accelerate(flags(compile=on), teacher, student, gen)
        assert (student._compiled_call_impl is not None) == on
        opt_g = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.5, 0.999))
        opt_s = torch.optim.SGD(student.parameters(), 1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4)
        torch.manual_seed(1)
        seq = []
        for i in range(3):
            z, y = torch.randn(8, 100), torch.randint(0, 10, (8,))
            _, _, _, _, loss_g, loss_s = gdfq_step(teacher, student, gen, bns, z, y, calibrate=i == 0)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            opt_s.zero_grad()
            loss_s.backward()
            opt_s.step()
            seq.append((loss_g.item(), loss_s.item()))
        losses.append(seq)
    (g0, s0), (c0, d0) = losses[0][0], losses[1][0]
    assert abs(g0 - c0) <= 1e-4 * abs(g0) and abs(s0 - d0) <= 1e-4 * abs(s0), losses
    for (g, s), (c, d) in zip(losses[0][1:], losses[1][1:]):
        assert abs(g - c) <= 2e-2 * abs(g) and abs(s - d) <= 2e-2 * abs(s), losses


@pytest.mark.slow
def test_amp_flag_end_to_end_marks_the_protocol(tiny_data, teachers, tmp_path):
    r = run_script(["gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
                    "--run-name", "bf16", "--amp", "bf16", *TINY], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert s["protocol"]["precision"] == "bf16 autocast" and s["args"]["amp"] == "bf16"
    assert s["final_top1"] is not None
    r = run_script(["gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
                    "--run-name", "fp32", *TINY], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "precision" not in json.loads((tmp_path / "fp32" / "summary.json").read_text())["protocol"]


def test_compile_leaves_the_eager_models_alone(monkeypatch):
    monkeypatch.setattr(common, "_compile_available", lambda device: None)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    accelerate(flags(compile=True), a, b, eager=(b,))
    assert a._compiled_call_impl is not None and b._compiled_call_impl is None


@pytest.mark.slow
def test_synq_compiled_takes_its_second_backward_and_keeps_grad_cam_eager(tiny_data, teachers, tmp_path):
    """SynQ's sign-gradient step calls autograd.grad(..., retain_graph=True) before the loss's backward: a compiled
    backward that donates its saved buffers refuses that (RuntimeError), so accelerate keeps them. Its Grad-CAM
    differentiates by an activation inside the forward, which compiling hides: with it on, teacher and student stay
    eager, and the run says so."""
    common_args = ["synq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
                   "--compile", "--num-images", "8", "--syn-batch", "8", "--syn-iters", "1", *TINY]
    r = run_script([*common_args, "--run-name", "all", "--lambda-cam", "0"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "leaves the teacher and student eager" not in r.stdout
    s = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert s["args"]["compile"] is True and s["final_top1"] is not None
    r = run_script([*common_args, "--run-name", "cam"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "note: --compile leaves the teacher and student eager" in r.stdout


@pytest.mark.slow
def test_synq_amp_bf16_takes_grad_cam_through_the_bf16_activation(tiny_data, teachers, tmp_path):
    """Under --amp bf16 the last conv's output is bf16: Grad-CAM differentiates by that very tensor (a float32 copy
    of it is not in the graph: autograd.grad failed with 'appears to not have been used in the graph')."""
    r = run_script(["synq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
                    "--amp", "bf16", "--num-images", "8", "--syn-batch", "8", "--syn-iters", "1", "--run-name", "b",
                    *TINY], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["losses/cam"] > 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["final_top1"] is not None


def test_keep_freed_memory_switches_glibc_malloc_and_back():
    """common.setup keeps freed memory on a CPU (glibc: no mmap'd blocks, no trimming): a freed 64 MB tensor stays in
    the process (its resident size does not drop) with it, and goes back to the OS with glibc's defaults."""
    import platform
    if platform.libc_ver()[0] != "glibc" or not os.path.isfile("/proc/self/statm"):
        pytest.skip("not Linux glibc")

    def freed_mb():
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        a = torch.ones(16 << 20)  # 64 MB, touched
        before = rss()
        del a
        return before - rss()
    try:
        assert common.keep_freed_memory(True)
        assert freed_mb() < 16
        assert common.keep_freed_memory(False)
        assert freed_mb() > 48
    finally:
        common.keep_freed_memory(False)
