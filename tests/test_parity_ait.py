"""AIT against its reference code (iamkanghyunchoi/ait, GDFQ_AIT): the KL-only student loss and gradient inundation,
one and two steps, capped (first student epoch) and uncapped, on the reference's own gradients."""
import pytest
import torch
from conftest import assert_close, fixture, frozen_student, names, parity_teacher

from ait import GradientInundation, kd_loss
from common import weight_codes


def qnames(d):
    return names(d["qnames"])


BATCHED = pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])


def gi_over_teacher(names, batched=False, **kw):
    """Fresh parameters equal to the teacher's weights, under our GI at the reference's settings; `batched` runs
    the search without host synchronisation (CUDA's default), here on the CPU."""
    sd = parity_teacher().state_dict()
    params = [torch.nn.Parameter(sd[n].clone()) for n in names]
    return params, GradientInundation(params, lr=1e-4, wbits=4, threshold=1e-3, momentum=0.9, batched=batched, **kw)


def alphas(opt):
    return [float(a) for a in opt.last_alphas]


def changed(p0, p1):
    return (weight_codes(p0, 4) != weight_codes(p1, 4)).sum().item() / p0.numel()  # exact, as the fixture


def test_kl_only_student_loss_and_gradients():
    ref, gen = fixture("ait", "student_kl.pt"), fixture("gdfq", "generator.pt")
    step = fixture("gdfq", "student_step.pt")
    t_logits = fixture("gdfq", "gen_loss.pt")["t_logits"]
    student = frozen_student(parity_teacher(), step["act_lo"], step["act_hi"])
    s = student(gen["images"])
    loss = kd_loss(s, t_logits, 20.0)  # ait.py's default reduction 'mean', x T^2, no CE
    loss.backward()
    assert_close(s, ref["s_logits"], 1e-5, "student logits")
    assert_close(loss, ref["loss_S"], 1e-4, "KL-only loss")  # the fixture's tolerance: the KL term is small
    # the same function on the reference's own logits, in float64: the KL at T = 20 sums terms ~10^3 times its value,
    # so the reference's float32 loss carries ~1e-5 of rounding (8.4e-6 from the float64 value; another CPU's float32
    # sum lands elsewhere within it)
    exact = kd_loss(ref["s_logits"].double(), t_logits.double(), 20.0)
    assert float(exact) == pytest.approx(float(ref["loss_S"]), rel=2e-5)
    params = dict(student.named_parameters())
    for name in names(ref["param_names"]):
        assert_close(params[name].grad.norm(), ref[f"grad_norm/{name}"], 1e-4, f"grad norm {name}")
    for key in [k for k in ref if k.startswith("grad/")]:
        assert_close(params[key[5:]].grad, ref[key], 1e-4, key)


@BATCHED
@pytest.mark.parametrize("mode", ["uncapped", "capped"])
def test_gi_first_step_chooses_the_reference_alpha(mode, batched):
    ref = fixture("ait", "gi_step1.pt")
    names = qnames(ref)
    params, opt = gi_over_teacher(names, batched)
    opt.first_epoch = mode == "capped"  # the reference's first student epoch: doubling stops at 128
    p0 = [p.detach().clone() for p in params]
    for p, n in zip(params, names):
        p.grad = ref[f"grad1/{n}"].clone()
    opt.step()
    assert alphas(opt) == ref[f"{mode}/alphas"].tolist()  # every alpha exactly, incl. missed-threshold midpoints
    assert [changed(a, p.detach()) for a, p in zip(p0, params)] == ref[f"{mode}/changed"].tolist()
    for p, n in zip(params, names):
        if f"{mode}/after/{n}" in ref:
            assert_close(p.detach(), ref[f"{mode}/after/{n}"], 1e-6, f"{mode} weight after step: {n}")
    assert int(opt.cap_hits) == (1 if mode == "capped" else 0)  # fc.weight: 128 without reaching the threshold


@BATCHED
def test_gi_reference_result_can_miss_threshold_and_upper_flag_reaches_it(batched):
    """The reference keeps the last bisection midpoint; --gi-result upper returns the end that reaches it."""
    ref = fixture("ait", "gi_step1.pt")
    names = qnames(ref)
    params, opt = gi_over_teacher(names, batched, result="upper")
    p0 = [p.detach().clone() for p in params]
    for p, n in zip(params, names):
        p.grad = ref[f"grad1/{n}"].clone()
    opt.step()
    official = ref["uncapped/alphas"].tolist()
    missed = [i for i, c in enumerate(ref["uncapped/changed"].tolist()) if c < 1e-3]
    assert len(missed) == 7  # the fixture README's 7 tensors
    for i, (a, p) in enumerate(zip(p0, params)):
        assert changed(a, p.detach()) >= 1e-3
        assert alphas(opt)[i] >= official[i] and (alphas(opt)[i] > official[i]) == (i in missed)


@BATCHED
@pytest.mark.parametrize("scale", ["0.001", "1e-05"])
@pytest.mark.parametrize("name", ["layer3.2.conv2.weight", "fc.weight"])
def test_gi_tiny_gradients(name, scale, batched):
    """Uncapped the reference doubles without bound (7168 ... 22544384 here); our default cap is far above."""
    ref, tiny = fixture("ait", "gi_step1.pt"), f"tiny/{name}/{scale}"
    for mode in ("uncapped", "capped"):
        params, opt = gi_over_teacher([name], batched)
        opt.first_epoch = mode == "capped"
        p0 = params[0].detach().clone()
        params[0].grad = ref[f"grad1/{name}"] * float(scale)
        opt.step()
        assert alphas(opt) == [float(ref[f"{tiny}/{mode}/alpha"])]
        after = ref[f"{tiny}/{mode}/after"]
        if after.dim() == 0:  # ||p_after - p0||
            assert_close((params[0].detach() - p0).norm(), after, 1e-5, f"{tiny} {mode} step norm")
        else:
            assert_close(params[0].detach(), after, 1e-6, f"{tiny} {mode} weight")


@BATCHED
def test_gi_second_step_with_momentum(batched):
    ref1, ref = fixture("ait", "gi_step1.pt"), fixture("ait", "gi_step2.pt")
    all_names = qnames(ref)
    names = [n for n in all_names if f"grad2/{n}" in ref]
    params, opt = gi_over_teacher(names, batched)
    for p, n in zip(params, names):
        p.data.copy_(ref1[f"uncapped/after/{n}"])
        opt.state[p]["buf"] = ref1[f"grad1/{n}"].clone()  # first step: buffer = raw gradient
        p.grad = ref[f"grad2/{n}"].clone()
    p1 = [p.detach().clone() for p in params]
    opt.step()
    official = dict(zip(all_names, ref["alphas"].tolist()))
    changed_ref = dict(zip(all_names, ref["changed"].tolist()))
    assert alphas(opt) == [official[n] for n in names]
    for a, p, n in zip(p1, params, names):
        assert_close(p.detach(), ref[f"after/{n}"], 1e-6, f"weight after step 2: {n}")
        assert changed(a, p.detach()) == changed_ref[n]
    assert changed_ref["conv1.weight"] == changed_ref["fc.weight"] == 0  # the last-midpoint rule changes no code


def test_plain_sgd_parameters_step():
    """BN and the FC bias: torch's Nesterov SGD, lr 1e-4, momentum 0.9, weight decay 0, as ait.py builds it."""
    ref, kl = fixture("ait", "gi_step1.pt"), fixture("ait", "student_kl.pt")
    sd = parity_teacher().state_dict()
    for key in [k for k in ref if k.startswith("sgd/after/")]:
        name = key[len("sgd/after/"):]
        p = torch.nn.Parameter(sd[name].clone())
        p.grad = kl[f"grad/{name}"].clone()
        torch.optim.SGD([p], lr=1e-4, momentum=0.9, nesterov=True, weight_decay=0.0).step()
        assert_close(p.detach(), ref[key], 1e-6, key)
