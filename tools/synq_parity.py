"""Make tests/fixtures/synq/*.pt by running the SynQ reference code (github.com/snudm-starlab/SynQ, its src/
folder, checked out by you) on fixed inputs on the CPU. Nothing of the reference is in this file: it imports the
reference's own modules from REF_SRC and calls them; what it does around them (seeds, inputs, one training step
composed as the reference's trainer composes it) is written out here in the open.

    python tools/synq_parity.py /path/to/SynQ/src tests/fixtures/synq [--float64]

What is run (float32, one thread; with --float64 the synthesis and the fine-tuning step again in float64, the same
networks cast to double, into synthesis_f64.pt and finetune_f64.pt, without the state dicts; Tensor.float() then
casts to float64, since the reference builds a one-hot mask with it):
- lowpass.pt: Trainer.apply_filters on random images for D0 = 80, 20, 5.
- synthesis.pt: DistillData.get_distil_data (the synthesis of one batch of 8 CIFAR images, 1000 Adam steps,
  beta 0.1, gamma 0.5) with a random ResNet-20 teacher: the per-step losses it prints and the final images/labels.
- finetune.pt: one fine-tuning step of a W4A4 student on 8 images: Trainer.loss_fn_kd, Trainer.forward (KD, the
  selective CE, the FA loss through Trainer.hook_activation on every residual branch), the sign-gradient
  perturbation, GradCAM masks of teacher and student (gradcam.GradCAM) and the CAM loss, and the student's
  parameter gradients of the total loss.
Patches for this machine only: .cuda() is a no-op, ReduceLROnPlateau ignores the verbose= this torch dropped,
and cv2 (used by the reference's visualisation helpers, not here) is a stub module.
"""
import contextlib
import io
import os
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_reference(src):
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau  # this torch no longer takes verbose=

    class ReduceLROnPlateau(plateau):
        def __init__(self, *a, verbose=None, **k):
            super().__init__(*a, **k)
    torch.optim.lr_scheduler.ReduceLROnPlateau = ReduceLROnPlateau
    for p in (src, os.path.join(src, "data_generate")):
        sys.path.insert(0, p)
    import distill_data
    import gradcam
    import trainer_direct
    return trainer_direct, gradcam, distill_data


def teacher_and_student():
    from common import CifarResNet, quantize_model, set_calibrating
    torch.manual_seed(0)
    t = CifarResNet(20, 10)
    for m in t.modules():  # non-trivial BN statistics, as a trained teacher has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    t = t.eval().requires_grad_(False)
    s = quantize_model(t, 4, 4).requires_grad_(True).eval()
    set_calibrating(s, True)
    with torch.no_grad():
        s(torch.randn(16, 3, 32, 32))
    set_calibrating(s, False)
    return t, s


def main(src, out, float64=False):
    torch.set_num_threads(1)
    trainer_direct, gradcam, distill_data = load_reference(src)
    Trainer = trainer_direct.Trainer
    os.makedirs(out, exist_ok=True)
    suffix = "_f64" if float64 else ""

    # the low-pass filter
    if not float64:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, 32, 32, generator=g)
        torch.save({"images": x, **{f"d{d}": Trainer.apply_filters(None, x, d) for d in (80, 20, 5)}},
                   os.path.join(out, "lowpass.pt"))

    # the synthesis of one batch
    teacher, student = teacher_and_student()
    if float64:  # the float32 networks, cast; every tensor the reference creates is float64 from here on
        teacher, student = teacher.double(), student.double()
        torch.set_default_dtype(torch.float64)
        torch.Tensor.float = lambda self, *a, **k: self.to(torch.float64)  # its masks are built with .float()
    args = types.SimpleNamespace(lbns=False, num_data=8)
    dd = distill_data.DistillData(args)
    torch.manual_seed(123)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.suppress(SystemExit):
        dd.get_distil_data("resnet20_cifar10", teacher, batch_size=8, beta=0.1, gamma=0.5, save_path_head=out)
    steps = [ln.split() for ln in log.getvalue().splitlines() if "mean_loss" in ln]
    losses = torch.tensor([[float(w[5]), float(w[7]), float(w[9])] for w in steps])  # mean, var, target
    import pickle
    stem = os.path.join(out, "resnet20_cifar10_%s_hardsample_beta0.1_gamma0.5_group1.pickle")
    with open(stem % "refined_gaussian", "rb") as f:
        images = torch.as_tensor(pickle.load(f)[0])
    with open(stem % "labels", "rb") as f:
        labels = torch.tensor(pickle.load(f)[0])
    for k in ("refined_gaussian", "labels"):
        os.remove(stem % k)
    torch.save({"seed": 123, "n": 8, "iters": 1000, "beta": 0.1, "gamma": 0.5, "losses": losses, "images": images,
                "labels": labels}, os.path.join(out, f"synthesis{suffix}.pt"))
    for m in teacher.modules():  # get_distil_data left its hooks on the teacher
        m._forward_hooks.clear()

    # one fine-tuning step, composed as the reference's Trainer.train composes it after the warm-up
    settings = types.SimpleNamespace(alpha=20.0, temperature=20.0, lam=4000.0, eps=0.01, dataset="cifar10")
    targs = types.SimpleNamespace(lambda_ce=0.5, lambda_cam=50.0, lambda_pert=1.0, tau_selce=0.5, local_rank="cpu")
    me = types.SimpleNamespace(settings=settings, args=targs, model=student, criterion=nn.CrossEntropyLoss(),
                               kl_loss=nn.KLDivLoss(reduction="batchmean"), activation=[], activation_teacher=[])
    for name in ("loss_fn_kd", "loss_fa", "forward", "channel_attention", "hook_activation",
                 "hook_activation_teacher"):
        setattr(me, name, types.MethodType(getattr(Trainer, name), me))
    from common import BasicBlock
    for model, hook in ((teacher, me.hook_activation_teacher), (student, me.hook_activation)):
        for m in model.modules():
            if isinstance(m, BasicBlock):  # the residual branch's output (pytorchcv's ResUnit.body)
                m.bn2.register_forward_hook(hook)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 3, 32, 32, generator=g) * 1.5).requires_grad_(True)
    y = torch.randint(0, 10, (8,), generator=g)
    t_out = teacher(x)
    p_true = torch.gather(F.softmax(t_out, dim=1), 1, y.unsqueeze(1)).squeeze()
    mask = ((1 - p_true) < targs.tau_selce).long()
    s_out, kd, fa, ce = me.forward(x, t_out, y, mask)
    loss_s = kd + targs.lambda_ce * ce + fa
    pert = torch.sgn(torch.autograd.grad(loss_s, x, retain_graph=True)[0])
    me.activation_teacher.clear()
    me.activation.clear()
    with torch.no_grad():
        x_p = x + settings.eps * pert
        t_out_p = teacher(x_p.detach())
    _, kd_p, _, ce_p = me.forward(x_p.detach(), t_out_p.detach(), y, mask)
    loss_p = kd_p + targs.lambda_ce * ce_p
    cam_t = gradcam.GradCAM({"type": "resnet", "arch": teacher, "layer_name": "stage4", "input_size": (32, 32)})
    cam_s = gradcam.GradCAM({"type": "resnet", "arch": student, "layer_name": "stage4", "input_size": (32, 32)})
    with contextlib.redirect_stdout(io.StringIO()):
        mask_t, _ = cam_t(x, retain_graph=True)
        mask_s, _ = cam_s(x, retain_graph=True)
    loss_cam = F.mse_loss(mask_t, mask_s)
    loss = loss_s + targs.lambda_pert * loss_p + targs.lambda_cam * loss_cam
    student.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    result = {"x": x.detach(), "y": y, "easy": mask.bool(), "kd": kd.detach(), "ce": ce.detach(),
              "fa": fa.detach().reshape(()), "pert": pert, "kd_p": kd_p.detach(), "ce_p": ce_p.detach(),
              "cam_teacher": mask_t.detach(), "cam_student": mask_s.detach(), "loss_cam": loss_cam.detach(),
              "loss": loss.detach().reshape(()), "grads": grads}
    if not float64:
        result.update(student_state=student.state_dict(), teacher_state=teacher.state_dict())
    torch.save(result, os.path.join(out, f"finetune{suffix}.pt"))
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print("usage: " + __doc__.strip())
        sys.exit(0)
    if len(sys.argv) < 3 or not os.path.isfile(os.path.join(sys.argv[1], "data_generate", "distill_data.py")):
        print("error: usage: python tools/synq_parity.py SYNQ_CHECKOUT/src OUT_DIR [--float64] (SRC must hold "
              "data_generate/distill_data.py)", file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:3], float64="--float64" in sys.argv[3:])
