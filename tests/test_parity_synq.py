"""SynQ against its reference code (snudm-starlab/SynQ, run on fixed inputs by tools/synq_parity.py): the low-pass
filter, the synthesis of a batch (per-step losses and the final images), and one whole fine-tuning step (KD, the
selective CE, FA, the perturbation, both Grad-CAM maps, the CAM loss, the total loss and every student gradient)."""
import torch
from conftest import assert_close, fixture

import synq
from common import CifarResNet, quantize_model, set_calibrating


def models(ref):
    teacher = CifarResNet(20, 10)
    teacher.load_state_dict(ref["teacher_state"])
    teacher = teacher.eval().requires_grad_(False)
    student = quantize_model(teacher, 4, 4).requires_grad_(True).eval()
    student.load_state_dict(ref["student_state"])
    set_calibrating(student, False)  # the fixture's ranges, fixed (as after the warm-up)
    return teacher, student


def test_low_pass_filter():
    ref = fixture("synq", "lowpass.pt")
    for d in (80, 20, 5):
        assert_close(synq.low_pass(ref["images"], d), ref[f"d{d}"], 1e-6, f"D0 = {d}")
    # D0 = 80 on 32 x 32 images: H >= exp(-512 / 12800) = 0.96 everywhere, so the filter is nearly the identity
    assert (synq.low_pass(ref["images"], 80) - ref["images"]).abs().max() < 0.1 * ref["images"].abs().max()
    assert torch.equal(synq.low_pass(ref["images"], 0), ref["images"])  # --d-zero 0: no filter


def test_synthesis_losses_and_images():
    ref = fixture("synq", "synthesis.pt")
    teacher = CifarResNet(20, 10)
    teacher.load_state_dict(fixture("synq", "finetune.pt")["teacher_state"])  # the same random teacher
    teacher = teacher.eval().requires_grad_(False)
    stats = synq.BNStats(teacher)
    torch.manual_seed(ref["seed"])
    # the first steps, loss by loss, with our step function
    x = torch.randn(ref["n"], 3, 32, 32).requires_grad_(True)
    y = torch.randint(0, 10, (ref["n"],))
    assert torch.equal(y, ref["labels"])
    opt = torch.optim.Adam([x], lr=0.5)
    for step in range(5):
        stats.active = True
        logits = teacher(x)
        stats.active = False
        m, v = stats()
        p = torch.softmax(logits, 1).gather(1, y[:, None])[:, 0]
        ce = ref["beta"] * ((1 - p).clamp(min=1e-12).pow(ref["gamma"]) *
                            torch.nn.functional.cross_entropy(logits, y, reduction="none")).mean()
        assert_close(torch.stack([m, v, ce]).detach(), ref["losses"][step], 1e-5, f"losses at step {step}")
        opt.zero_grad()
        (m + v + ce).backward()
        opt.step()
    # the whole batch through synthesize_batch: same losses' trajectory, images within rounding drift
    torch.manual_seed(ref["seed"])
    images, labels, loss, acc = synq.synthesize_batch(teacher, stats, ref["n"], ref["iters"], 0.5, ref["beta"],
                                                      ref["gamma"], 10, torch.device("cpu"))
    assert torch.equal(labels, ref["labels"])
    final = ref["losses"][-1].sum()
    assert abs(loss - float(final)) <= 0.05 * float(final), (loss, float(final))
    rel = (images - ref["images"]).norm() / ref["images"].norm()
    assert rel < 0.05, f"final images {rel:.3g} apart (relative L2)"


def test_one_finetuning_step_matches_the_reference():
    ref = fixture("synq", "finetune.pt")
    teacher, student = models(ref)
    args = synq.parse(["--teacher", "chenyaofo"])
    s_taps, t_taps = synq.Taps(student), synq.Taps(teacher)
    x, y = ref["x"].clone(), ref["y"]
    loss, parts = synq.finetune_losses(args, student, teacher, s_taps, t_taps, x, y)
    for k in ("kd", "ce", "fa"):
        assert_close(parts[k].detach(), ref[k], 1e-5, k)
    assert_close(parts["loss_p"].detach(), ref["kd_p"] + 0.5 * ref["ce_p"], 1e-5, "perturbed loss")
    assert_close(parts["cam"].detach(), ref["loss_cam"], 1e-4, "CAM loss")
    assert_close(loss.detach(), ref["loss"], 1e-5, "total loss")
    student.zero_grad()
    loss.backward()
    grads = dict(student.named_parameters())
    assert set(ref["grads"]) == {n for n, p in grads.items() if p.grad is not None}
    for n, g in ref["grads"].items():
        assert_close(grads[n].grad, g, 1e-4, f"gradient of {n}")


def test_grad_cam_maps_match_the_reference():
    ref = fixture("synq", "finetune.pt")
    teacher, student = models(ref)
    for model, key in ((teacher, "cam_teacher"), (student, "cam_student")):
        taps = synq.Taps(model)
        x = ref["x"].clone().requires_grad_(True)
        logits, _, last = taps(model, x)
        assert_close(synq.grad_cam(logits, last, (32, 32)).detach(), ref[key], 1e-4, key)
