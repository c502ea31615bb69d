"""CIFAR ResNet topology, both weight layouts, teacher loading errors, the upsample-conv layer."""
import pytest
import torch
import torch.nn.functional as F
from conftest import random_teacher

from common import CifarResNet, UpsampleConv3x3, UserError, load_teacher, pytorchcv_to_native


def pytorchcv_names(sd):
    """Native -> pytorchcv key names, written from the layout spec independently of common.pytorchcv_to_native."""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "conv1":
            n = "features.init_block.conv." + p[1]
        elif p[0] == "bn1":
            n = "features.init_block.bn." + p[1]
        elif p[0] == "fc":
            n = "output." + p[1]
        else:
            s, u = int(p[0][5:]), int(p[1]) + 1
            sub = {"conv1": "body.conv1.conv", "bn1": "body.conv1.bn", "conv2": "body.conv2.conv",
                   "bn2": "body.conv2.bn"}
            if p[2] == "downsample":
                n = f"features.stage{s}.unit{u}.identity_conv.{'conv' if p[3] == '0' else 'bn'}.{p[4]}"
            else:
                n = f"features.stage{s}.unit{u}.{sub[p[2]]}.{p[3]}"
        out[n] = v
    return out


@pytest.mark.parametrize("classes,params", [(10, 272474), (100, 278324)])
def test_resnet20_param_count(classes, params):
    assert sum(p.numel() for p in CifarResNet(20, classes).parameters()) == params


def test_deeper_resnets_build():
    assert sum(1 for _ in CifarResNet(56, 10).layer1) == 9
    with pytest.raises(UserError):
        CifarResNet(21, 10)


def test_both_layouts_load_identically(tmp_path):
    m = random_teacher(10)
    sd = m.state_dict()
    cv = pytorchcv_names(sd)
    assert any(k == "features.stage2.unit1.identity_conv.conv.weight" for k in cv)
    assert pytorchcv_to_native(cv).keys() == sd.keys()
    torch.save(sd, tmp_path / "a.pth")
    torch.save({k: v for k, v in cv.items() if not k.endswith("num_batches_tracked")}, tmp_path / "b.pth")
    a, ia = load_teacher(str(tmp_path / "a.pth"), "cifar10")
    b, ib = load_teacher(str(tmp_path / "b.pth"), "cifar10")
    assert (ia["layout"], ib["layout"]) == ("chenyaofo", "pytorchcv")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), m(x))


def test_normalisation_comes_with_the_teacher(tmp_path):
    torch.save(random_teacher(100).state_dict(), tmp_path / "c100.pth")
    torch.save(pytorchcv_names(random_teacher(100).state_dict()), tmp_path / "cv100.pth")
    assert load_teacher(str(tmp_path / "c100.pth"), "cifar100")[1]["std"] == (0.2673, 0.2564, 0.2761)
    assert load_teacher(str(tmp_path / "cv100.pth"), "cifar100")[1]["std"] == (0.2023, 0.1994, 0.2010)


def test_mismatched_teacher_names_the_keys(tmp_path):
    torch.save(random_teacher(100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(UserError, match=r"fc\.weight: file \(100, 64\) vs model \(10, 64\)"):
        load_teacher(str(tmp_path / "c100.pth"), "cifar10")
    sd = random_teacher(10).state_dict()
    del sd["layer3.2.conv2.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"missing layer3\.2\.conv2\.weight"):
        load_teacher(str(tmp_path / "broken.pth"), "cifar10")
    with pytest.raises(UserError, match="no such file"):
        load_teacher(str(tmp_path / "nope.pth"), "cifar10")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a PyTorch weights file"):
        load_teacher(str(tmp_path / "junk.pth"), "cifar10")


def test_forward_features():
    m = random_teacher(10)
    x = torch.randn(2, 3, 32, 32)
    logits, f = m.forward_features(x)
    assert torch.equal(logits, m(x))
    assert [t.shape[1:] for t in f["stages"]] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)] and f["pool"].shape == (2, 64)


def test_akt_residual_branch_hooks():
    """akt.py reads the residual branches with its own forward hooks: the BN output of each unit's second conv,
    before the add, only during its calls (the shared ResNet keeps nothing)."""
    import akt
    m = random_teacher(10)
    x = torch.randn(2, 3, 32, 32)
    branches = akt.ResidualBranches(m)
    logits, body = branches(m, x)
    assert torch.equal(logits, m(x)) and len(body) == 9 and body[3].shape == (2, 32, 16, 16)
    u = m.layer1[0]
    h = m.relu(m.bn1(m.conv1(x)))
    assert torch.allclose(body[0], u.bn2(u.conv2(u.relu1(u.bn1(u.conv1(h))))))
    m(x)
    assert branches.feats == []  # plain forwards keep nothing


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_equals_interpolate_then_conv(channels_last):
    torch.manual_seed(0)
    m = UpsampleConv3x3(6, 5)
    x = torch.randn(3, 6, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2), m.weight, m.bias, padding=1)
    out = m(x)
    assert out.shape == (3, 5, 8, 10) and torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(ref)
    params = (x, m.weight, m.bias)
    for a, b in zip(torch.autograd.grad(ref, params, g), torch.autograd.grad(out, params, g)):
        assert torch.allclose(a, b, atol=1e-4)
    m, x = m.double(), x.detach().double()  # the same function: in float64 the difference is float64 rounding
    ref = F.conv2d(F.interpolate(x, scale_factor=2), m.weight, m.bias, padding=1)
    assert (m(x) - ref).abs().max() < 1e-12


def test_download_unzips_checks_hash_and_caches(tmp_path):
    """The pytorchcv path: a release zip holding NAME.pth whose SHA-1 starts with the prefix (file:// URL, offline)."""
    import hashlib
    import io
    import zipfile

    from common import _download
    buf = io.BytesIO()
    torch.save(random_teacher(10).state_dict(), buf)
    blob = buf.getvalue()
    sha1 = hashlib.sha1(blob).hexdigest()
    name = f"resnet20_cifar10-0000-{sha1[:8]}.pth"
    with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
        z.writestr(name, blob)
    url = (tmp_path / f"{name}.zip").as_uri()
    path = _download(url, "sha1", sha1[:8], str(tmp_path / "cache"))
    assert path == str(tmp_path / "cache" / name) and open(path, "rb").read() == blob
    (tmp_path / f"{name}.zip").unlink()  # cached: no second download
    assert _download(url, "sha1", sha1[:8], str(tmp_path / "cache")) == path
    with pytest.raises(UserError, match="expected 00000000"):
        _download(url.replace(name, "x"), "sha1", "00000000", str(tmp_path / "cache2")) if False else \
            _download((tmp_path / "w.pth").as_uri() if (tmp_path / "w.pth").write_bytes(blob) else "", "sha256",
                      "00000000", str(tmp_path / "cache2"))
