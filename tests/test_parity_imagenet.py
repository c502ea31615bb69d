"""ImageNet parity: GDFQ's reference ImageNet code (xushoukai/GDFQ @ a93210e) run out of tree on seeded weights
(tests/fixtures/imagenet/README.md): its conditional generator, its BNS + CE generator loss through the papers'
pytorchcv ResNet-18, and its quantized ResNet-18. Ours: the same weights, through common.py's pytorchcv -> torchvision
mapping, the scripts' GeneratorImageNet / BNStatsLoss, and common.quantize_model. No ImageNet data is needed."""
import torch
import torch.nn.functional as F
from conftest import assert_close, fixture

import common
import gdfq

# the reference generator's module names -> ours
GEN_NAMES = {"l1.0.": "l1.", "conv_blocks0_0.": "bn0.", "conv_blocks1_0.": "conv1.", "conv_blocks1_1.": "bn1.",
             "conv_blocks2_0.": "conv2.", "conv_blocks2_1.": "bn2.", "conv_blocks2_3.": "conv3.",
             "conv_blocks2_5.": "bn3."}


def seeded(keys, seed):
    """The fixture's weights: every floating tensor in sorted-name order from one generator (as the script that
    wrote the fixture did)."""
    g, out = torch.Generator().manual_seed(seed), {}
    for k, shape in sorted(keys):
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=torch.long)
            continue
        r = torch.randn(shape, generator=g)
        if k.endswith("running_var"):
            out[k] = r.abs() + 0.5
        elif k.endswith(".weight") and len(shape) == 1 and "weights" not in k:
            out[k] = 1 + 0.1 * r
        elif len(shape) > 1 and "weights" not in k and "biases" not in k:  # conv / linear: He-scaled
            out[k] = r * (2.0 / r[0].numel()) ** 0.5
        else:
            out[k] = 0.1 * r
    return out


def to_ours(name):
    for a, b in GEN_NAMES.items():
        if name.startswith(a):
            return b + name[len(a):]
    raise KeyError(name)


def our_generator(ref):
    gen = gdfq.GeneratorImageNet(1000, 100, img_size=16)
    gen.load_state_dict({to_ours(k): v for k, v in seeded(ref["gen_keys"], 1).items()})
    return gen.train()


def test_imagenet_generator_images_running_stats_and_gradients():
    ref = fixture("imagenet", "gdfq_imagenet.pt")
    gen = our_generator(ref)
    img = gen(ref["gen_z"], ref["gen_y"])
    assert_close(img, ref["gen_images"], 1e-4, "images")
    (img * torch.linspace(-1, 1, img.numel()).view_as(img)).sum().backward()
    used, params = ref["gen_y"].unique(), dict(gen.named_parameters())
    for k, g in ref["gen_grads"].items():
        p = params[to_ours(k)]
        ours = p.grad[used] if "weights" in k or "biases" in k else p.grad
        if k in ("conv_blocks1_0.bias", "conv_blocks2_0.bias"):  # a bias before a BN in training mode: its
            w = params[to_ours(k)[:-4] + "weight"].grad  # gradient is 0, both sides float rounding
            assert ours.abs().max() <= 1e-3 * w.abs().max() and g.abs().max() <= 1e-3 * w.abs().max(), k
            continue
        assert_close(ours, g, 2e-3, f"gradient of {k}")
    state = gen.state_dict()
    for k, v in ref["gen_running"].items():
        assert_close(state[to_ours(k)], v, 1e-4, k)


def pytorchcv_teacher(ref):
    model = common.imagenet_model("resnet18")
    sd = common.pytorchcv_resnet_to_torchvision(seeded(ref["teacher_keys"], 3), model)
    common.load_weights_strict(model, sd, "resnet18")
    return model.eval().requires_grad_(False)


def bns_input():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))


def test_pytorchcv_resnet18_maps_onto_torchvision_and_bns_loss_matches():
    ref = fixture("imagenet", "gdfq_imagenet.pt")
    teacher = pytorchcv_teacher(ref)
    bns_loss = gdfq.BNStatsLoss(teacher)
    x = bns_input().requires_grad_(True)
    bns_loss.active = True
    logits = teacher(x)
    bns_loss.active = False
    assert len(bns_loss.stats) == ref["bns_layers"] == 20
    assert_close(logits, ref["bns_logits"], 1e-4, "teacher logits (the pytorchcv -> torchvision mapping)")
    bns = bns_loss()
    loss_g = F.cross_entropy(logits, ref["bns_labels"]) + 0.1 * bns
    assert_close(bns, ref["bns"], 1e-4, "BNS loss")
    assert_close(loss_g, ref["loss_g"], 1e-4, "generator loss")
    loss_g.backward()
    assert_close(x.grad, ref["bns_grad_x"], 1e-3, "gradient to the images")


def test_quantized_resnet18_matches_the_reference_quantizer():
    """Every conv and the FC per channel, a quantizer after each of the 17 ReLU places (the reference's QuantAct,
    calibrated on one batch with its bias-corrected EMA, then fixed)."""
    ref = fixture("imagenet", "gdfq_imagenet.pt")
    teacher, x = pytorchcv_teacher(ref), bns_input().double()  # both sides in float64: no rounding-boundary flips
    for bits in (4, 3):
        student = common.quantize_model(teacher, bits, bits, act_ema="reference").double().eval()
        quantizers = [m for m in student.modules() if isinstance(m, common.QuantReLU)]
        assert len(quantizers) == 17
        with torch.no_grad():
            student(x)
            common.set_calibrating(student, False)
            logits = student(x)
        ranges = torch.stack([torch.stack([q.lo, q.hi]) for q in quantizers])
        assert_close(ranges, ref[f"student_w{bits}_ranges"], 1e-9, f"W{bits}A{bits} activation ranges")
        assert_close(logits, ref[f"student_w{bits}_logits"], 1e-9, f"W{bits}A{bits} logits")


def test_split_relu_places_compute_torchvision_forward():
    """Each ReLU place its own module changes nothing in the float network."""
    import torchvision
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        ours = common.imagenet_model(arch).eval()
        theirs = getattr(torchvision.models, arch)().eval()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), arch


def test_pytorchcv_resnet50_maps_onto_torchvision_with_its_strides():
    """pytorchcv's ResNet-50 strides the bottleneck's first 1x1 conv (v1), torchvision's the 3x3 (v1.5): mapped, the
    torchvision model computes the reference model's logits (float64)."""
    ref = fixture("imagenet", "gdfq_imagenet.pt")
    model = common.imagenet_model("resnet50")
    common.load_weights_strict(model, common.pytorchcv_resnet_to_torchvision(seeded(ref["r50_keys"], 5), model))
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    with torch.no_grad():
        logits = model.double().eval()(bns_input()[:1].double())
    assert_close(logits, ref["r50_logits"], 1e-9, "ResNet-50 logits")


def test_adadfq_imagenet_losses_match_its_reference():
    """AKT on ImageNet takes AdaDFQ's ImageNet losses (hfutqian/AdaDFQ @ 84100f3, ImageNet/trainer.py): the entropy
    band with lambda_l 0.1 (ResNet-18, MobileNetV2) or 0.4 (ResNet-50) and the student's 5 x 5 x entropy at T = 5."""
    import akt
    ref = fixture("imagenet", "adadfq_imagenet.pt")
    t, s = ref["t"], ref["s"]
    y = torch.zeros(16, dtype=torch.long)
    onehot = akt.adadfq_generator_loss(t, s, y, 1000, h_low=-1.0, h_high=2.0)  # the band never binds: one-hot only
    for low, arch in ((0.1, "resnet18"), (0.4, "resnet50")):
        a = akt.parse(["--dataset", "imagenet", "--arch", arch])
        assert a.h_low == low and a.h_high == 0.8
        band = akt.adadfq_generator_loss(t, s, y, 1000, a.h_low, a.h_high) - onehot
        assert_close(band, ref[f"h_loss_low{low}"], 1e-4, f"entropy band, lambda_l {low}")
    a = akt.parse(["--dataset", "imagenet"])
    assert_close(akt.adadfq_student_loss(t, s, a.temperature, a.entropy_weight), ref["q_loss"], 1e-6, "student loss")
