"""tools/export.py: integer codes of every quantizer (hand values and their bit-width's range), bit packing, the
integer reference, the PyTorch student rebuilt from the .npz and the ONNX QDQ model (when onnx and onnxruntime are
installed) all compute what the fake-quantized student computes; end to end for a tiny trained student of every
method; bad input is one line."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, random_teacher, run_script

sys.path.insert(0, os.path.join(ROOT, "tools"))
import export  # noqa: E402
import faqd  # noqa: E402
import sqakd  # noqa: E402
from common import QConv2d, quantize_model, set_calibrating  # noqa: E402

SCRIPTS = ["gdfq", "ait", "akt", "lrq", "faqd", "sqakd", "synq"]


def test_pack_round_trip_and_refusal():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for qmin, step in ((-(2 ** (bits - 1)), 1), (-(2 ** bits - 1), 2), (0, 1)):
            codes = qmin + step * rng.integers(0, 2 ** bits, (7, 3, 3, 3))
            packed = export.pack(codes, qmin, step, bits)
            assert packed.nbytes == -(-codes.size * bits // 8)  # ceil(numel * bits / 8)
            assert np.array_equal(export.unpack(packed, codes.shape, qmin, step, bits), codes)
    with pytest.raises(ValueError):
        export.pack(np.array([-1, 0, 1]), -1, 2, 1)  # 0 is not on the binary grid {-1, +1}
    with pytest.raises(ValueError):
        export.pack(np.array([0, 4]), 0, 1, 2)  # 4 needs 3 bits


def test_zeroq_codes_by_hand():
    # one channel [-1, 0, 0.5, 1] at 2 bits: s = 3/2, z = round(-1.5) + 2 = 0, q = clamp(round(1.5 w), -2, 1)
    conv = QConv2d(1, 1, (1, 4), bias=False)
    conv.wbits = 2
    conv.weight.data = torch.tensor([[[[-1.0, 0.0, 0.5, 1.0]]]])
    w = conv.export_weight()
    assert w["codes"].flatten().tolist() == [-2, 0, 1, 1] and w["zero"].tolist() == [0]
    assert (w["qmin"], w["qmax"], w["code_step"]) == (-2, 1, 1)
    assert torch.allclose((w["scale"] * (w["codes"] - w["zero"])).float().flatten(),
                          torch.tensor([-4 / 3, 0.0, 2 / 3, 2 / 3]))


def test_faqd_codes_by_hand_and_equal_to_its_projection():
    w = torch.tensor([0.1, -0.2, 0.05, 0.7, -0.3])
    codes, scale = faqd.projection_codes(w, 2)  # mean|w| = 0.27, threshold 0.189: keeps -0.2, 0.7, -0.3
    assert codes.tolist() == [0, -1, 0, 1, -1] and abs(scale.item() - 1.2 / 5) < 1e-7
    codes, scale = faqd.projection_codes(w, 4)  # delta = 0.7/15, q = round(|w| / (2 delta)) = 1, 2, 1, 7, 3
    assert codes.tolist() == [1, -2, 1, 7, -3]
    torch.manual_seed(0)
    for bits in (1, 2, 4):
        w = torch.randn(16, 8, 3, 3)
        codes, scale = faqd.projection_codes(w, bits)
        assert torch.equal(codes * scale, faqd.project_weight(w, bits))
        assert codes.abs().max() <= {1: 1, 2: 1, 4: 7}[bits]


def zeroq_student(bits, x):
    m = quantize_model(random_teacher(10), bits, bits).eval()
    with torch.no_grad():
        m(x)  # calibrate the activation ranges on a batch
    set_calibrating(m, False)
    return m


def faqd_student(wbits, abits, x):
    args = SimpleNamespace(student_depth=20, teacher_depth=20, from_scratch=False, wbits=wbits, abits=abits,
                           float_acts=False, alpha_rate=0.01, device="cpu")
    m = faqd.build_student(args, random_teacher(10)).eval()
    for r in m.modules():  # steps that make every level occur
        if isinstance(r, faqd.FAQDReLU):
            r.alpha.data.fill_(1.5 / 2 ** abits)
    return m


def sqakd_student(method, bits, x):
    args = SimpleNamespace(quantizer=method, wbits=bits, abits=bits, delta=0.0, device="cpu")
    m = sqakd.build_student(args, random_teacher(10))
    sqakd.initialise(m, x)
    return m.eval()


CASES = ([("zeroq", b, b, zeroq_student) for b in range(2, 9)]  # every bit-width each family supports
         + [("faqd", w, a, faqd_student) for w, a in ((1, 1), (2, 2), (4, 4), (4, 8))]
         + [("sqakd-ewgs", b, b, sqakd_student) for b in range(1, 9)]
         + [(f"sqakd-{m}", b, b, sqakd_student) for m in ("pact", "lsq", "dorefa") for b in (1, 2, 3, 4, 8)])
FAST = {("zeroq", 4), ("faqd", 1), ("faqd", 4), ("sqakd-ewgs", 1), ("sqakd-lsq", 2)}  # the rest: slow
STUDENTS = [pytest.param(c, id=f"{c[0]}-w{c[1]}a{c[2]}", marks=() if (c[0], c[1]) in FAST else pytest.mark.slow)
            for c in CASES]


def make(case, x):
    """The student, with its BatchNorm statistics re-estimated on x (as training would adapt them), so that the
    untrained quantized network neither explodes nor dies and every quantizer sees a spread of values."""
    name, wb, ab, fn = case
    model = fn(wb, x) if name == "zeroq" else fn(wb, ab, x) if name == "faqd" else fn(name.split("-")[1], wb, x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(x)
        model.eval()
        if name == "zeroq":  # ranges of the activations the re-estimated BN gives
            for m in model.modules():
                if type(m).__name__ == "QuantReLU":
                    m.initialised.fill_(False)
            set_calibrating(model, True)
            model(x)
            set_calibrating(model, False)
    return model


@pytest.mark.parametrize("case", STUDENTS)
def test_every_quantizer_exports_and_computes_the_same(case, tmp_path):
    """Codes on their bit-width's grid; the integer reference, the rebuilt PyTorch student and ONNX Runtime give the
    fake-quant student's logits (up to float rounding) and its predictions."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    model = make(case, x)
    meta = {"method": case[0], "dataset": "cifar10", "wbits": case[1], "abits": case[2], "num_classes": 10,
            "depth": 20, "mean": [0, 0, 0], "std": [1, 1, 1]}
    export.export_npz(model, meta, tmp_path / "s.npz")
    arrays, meta = export.load_npz(tmp_path / "s.npz")
    n_quantized = 0
    for name, info in meta["layers"].items():
        w = info["weight"]
        if w is None:
            continue
        n_quantized += 1
        codes = export.unpack(arrays[f"{name}.w_packed"], info["shape"], w["qmin"], w["code_step"], w["bits"])
        assert codes.min() >= w["qmin"] and codes.max() <= w["qmax"] and w["bits"] == case[1]
        assert len(np.unique(codes)) <= 2 ** case[1]
    assert n_quantized >= 19 and len(meta["acts"]) + sum(i["input"] is not None for i in meta["layers"].values()) >= 18
    with torch.no_grad():
        fake = model(x).numpy()
        rebuilt = export.torch_student(arrays, meta)(x).numpy()
    integer = export.int_forward(arrays, meta, x.numpy())
    outs = {"rebuilt": rebuilt, "integer": integer}
    if _have_ort():
        sess = export.ort_session(export.build_onnx(arrays, meta).SerializeToString(), 1)
        outs["onnx"] = sess.run(None, {"input": x.numpy()})[0]
    # End to end, a value within float rounding of a rounding boundary may land on the other code, and the change
    # travels on; so: predictions equal except at near-ties, and most of them exactly equal (a wrong scale, zero point
    # or rounding would change nearly all). The arithmetic itself is checked layer by layer below.
    for k, v in outs.items():
        differ, near = export.near_ties(fake, v)
        assert differ == near and differ <= 2, f"{k}: {differ} predictions differ, {near} at near-ties"
    check_layer_by_layer(model, arrays, meta, x)


def check_layer_by_layer(model, arrays, meta, x):
    """Every layer of the integer reference, fed the fake-quant student's own input to that layer (its codes, where
    an activation quantizer made it), gives that layer's output (after BatchNorm) to float rounding; every
    activation quantizer gives the same codes but where the input lies within rounding of a boundary."""
    seen = {}
    mods = dict(model.named_modules())
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0].detach(), o.detach())))
             for n, m in mods.items() if n]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    producer = export.producers(meta)
    for name, info in meta["layers"].items():
        inp = seen[name][0].numpy()
        src = producer.get(name)
        if src is not None:  # the codes of the activation quantizer that made this input
            q = meta["acts"][src]
            a = export.Act(inp, np.round(inp / q["out_step"] + q["out_zero"]).astype(np.int64), q)
            assert np.allclose(q["out_step"] * (a.codes - q["out_zero"]), inp, atol=1e-6 * np.abs(inp).max())
        else:
            a = export.Act(inp)
        bn = export.bn_after(meta, name)
        ours = export.int_layer(arrays, meta, name, a, bn)
        ref = seen[bn][1].numpy() if bn else seen[name][1].numpy()
        off = np.abs(ours - ref) > 1e-4 * np.abs(ref).max()
        # a layer quantizing its own float input may put a boundary value on the other code: a few outputs move
        assert off.mean() <= (0.02 if info["input"] else 0.0), f"{name}: {off.mean():.2%} of outputs differ"
    for name, q in meta["acts"].items():
        inp, out = (t.numpy() for t in seen[name])
        ours = export.Act.quantized(inp, q).value
        assert (np.abs(ours - out) > 1e-5 * max(np.abs(out).max(), 1e-12)).mean() <= 1e-3, name


def _have_ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def test_float_onnx_graph_is_the_same_network_without_quantizers(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = zeroq_student(8, x)
    meta = {"method": "zeroq", "dataset": "cifar10", "wbits": 8, "abits": 8, "num_classes": 10, "depth": 20,
            "mean": [0, 0, 0], "std": [1, 1, 1]}
    export.export_npz(model, meta, tmp_path / "s.npz")
    arrays, meta = export.load_npz(tmp_path / "s.npz")
    sess = export.ort_session(export.build_onnx(arrays, meta, quantized=False).SerializeToString(), 1)
    for m in model.modules():  # the same student with float activations: dequantized weights, plain ReLUs
        for n, c in m.named_children():
            if type(c).__name__ == "QuantReLU":
                setattr(m, n, nn.ReLU())
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.allclose(sess.run(None, {"input": x.numpy()})[0], ref, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_trained_student_of_every_method_exports_and_agrees(script, tiny_data, tmp_path):
    """A tiny trained run of each method: export, then fake-quant, integer reference and ONNX Runtime agree on every
    test image (or differ only at near-ties, counted); the .npz alone gives the integer top-1."""
    from test_new_method import tiny
    path = tmp_path / "teacher.pth"
    torch.save(random_teacher(10).state_dict(), path)
    r = run_script([f"{script}.py", "--data-dir", tiny_data, "--teacher", str(path), "--out-dir", str(tmp_path),
                    "--run-name", "r", "--threads", "1", "--save-model", *tiny(script)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    flags = [] if _have_ort() else ["--no-onnx"]
    r = run_script(["tools/export.py", str(tmp_path / "r"), "--compare", "--data-dir", tiny_data, "--threads", "1",
                    *flags], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r" / "export.json").read_text())
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert rep["fake_quant_top1"] == round(s["final_top1"], 2)  # the exported student is the run's
    for k in ("integer", "onnxruntime") if _have_ort() else ("integer",):
        assert rep[f"{k}_disagreements"] == rep[f"{k}_disagreements_near_ties"], k
    assert rep["sizes"]["packed_weights"] < rep["sizes"]["float32_weights"] / 4
    r = run_script(["tools/export.py", "--int", str(tmp_path / "r" / "student_int.npz"), "--data-dir", tiny_data],
                   cwd=ROOT)
    assert r.returncode == 0 and f"integer reference top-1 {rep['integer_top1']:.2f}" in r.stdout, r.stderr


def test_export_from_a_checkpoint_without_model_pt(tiny_data, tmp_path):
    """A run made without --save-model exports from its last checkpoint (the same student)."""
    path = tmp_path / "teacher.pth"
    torch.save(random_teacher(10).state_dict(), path)
    r = run_script(["sqakd.py", "--data-dir", tiny_data, "--teacher", str(path), "--out-dir", str(tmp_path),
                    "--run-name", "r", "--threads", "1", "--epochs", "1", "--train-subset", "16", "--batch-size", "8"],
                   cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = run_script(["tools/export.py", str(tmp_path / "r"), "--compare", "--no-onnx", "--data-dir", tiny_data],
                   cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r" / "export.json").read_text())
    assert rep["fake_quant_top1"] == round(json.loads((tmp_path / "r" / "summary.json").read_text())["final_top1"], 2)


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    (tmp_path / "run").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "run" / "model.pt")
    for args, words in ((["tools/export.py", str(tmp_path / "nope")], "no such run directory"),
                        (["tools/export.py", str(tmp_path)], "neither model.pt nor checkpoint.pt"),
                        (["tools/export.py", "--int", str(tmp_path / "x.npz")], "no such file"),
                        (["tools/export.py", "--int", str(tmp_path / "bad.npz")], "is not a .npz archive"),
                        (["tools/export.py", str(tmp_path / "run")], "has no args.json")):
        r = run_script(args, cwd=ROOT)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_truncated_empty_or_foreign_npz_is_one_line(tmp_path):
    """--int on a truncated, empty or non-npz file (an .onnx, say): one line naming the file, exit 2."""
    torch.manual_seed(0)
    model = zeroq_student(4, torch.randn(4, 3, 32, 32))
    meta = {"method": "gdfq", "dataset": "cifar10", "wbits": 4, "abits": 4, "num_classes": 10, "depth": 20,
            "mean": [0.5] * 3, "std": [0.25] * 3}
    export.export_npz(model, meta, tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut_more.npz").write_bytes(data[:100])
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "student.onnx").write_bytes(b"\x08\x0a\x12\x07cleanqd" + bytes(200))
    for name in ("cut.npz", "cut_more.npz", "empty.npz", "student.onnx"):
        r = run_script(["tools/export.py", "--int", str(tmp_path / name)], cwd=ROOT)
        assert r.returncode == 2 and name in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert "Traceback" not in r.stderr and "pickled" not in r.stderr, r.stderr


def onnx_client_source():
    """The ONNX-only client of docs/deploy.md: the python block after its '<!-- onnx client -->' marker."""
    with open(os.path.join(ROOT, "docs", "deploy.md")) as f:
        page = f.read()
    return page.split("<!-- onnx client -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_onnx_carries_its_preprocessing_and_the_documented_client_scores_it(tmp_path, tiny_data):
    """The .onnx alone says how to feed it (metadata_props, input doc string), and docs/deploy.md's client, which
    imports neither cleanqd nor torch, gives the top-1 that tools/export.py --compare measures with ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    import onnx
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = zeroq_student(4, torch.randn(4, 3, 32, 32))
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.201]
    torch.save({"state_dict": model.state_dict(), "depth": 20, "num_classes": 10, "wbits": 4, "abits": 4,
                "mean": mean, "std": std}, run / "model.pt")
    (run / "args.json").write_text(json.dumps({"method": "gdfq", "dataset": "cifar10", "wbits": 4, "abits": 4}))
    r = run_script(["tools/export.py", str(run), "--compare", "--data-dir", tiny_data, "--threads", "1"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    props = {p.key: p.value for p in onnx.load(str(run / "student.onnx")).metadata_props}
    assert json.loads(props["input_mean"]) == mean and json.loads(props["input_std"]) == std
    assert props["input_layout"] == "NCHW" and props["input_scale"] == "1/255" and props["num_classes"] == "10"
    assert "/ 255" in onnx.load(str(run / "student.onnx")).graph.input[0].doc_string
    client = tmp_path / "client.py"
    client.write_text(onnx_client_source())
    assert "cleanqd" not in client.read_text() and "torch" not in client.read_text()
    r = subprocess.run([sys.executable, str(client), str(run / "student.onnx"),
                        os.path.join(tiny_data, "cifar-10-batches-py", "test_batch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads((run / "export.json").read_text())
    assert f"top-1 {rep['onnxruntime_top1']:.2f} on {rep['test_images']} images" in r.stdout, (r.stdout, rep)


def test_missing_onnx_is_one_line(tmp_path, tiny_data):
    """Without the optional onnx package: the .npz is written with a note; --compare says what to install."""
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "onnx.py").write_text("raise ImportError('no onnx here')\n")
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = zeroq_student(4, torch.randn(4, 3, 32, 32))
    torch.save({"state_dict": model.state_dict(), "depth": 20, "num_classes": 10, "wbits": 4, "abits": 4,
                "mean": [0.5] * 3, "std": [0.25] * 3}, run / "model.pt")
    (run / "args.json").write_text(json.dumps({"method": "gdfq", "dataset": "cifar10", "wbits": 4, "abits": 4}))
    env = {**os.environ, "PYTHONPATH": str(fake)}
    import subprocess
    r = subprocess.run([sys.executable, "tools/export.py", str(run)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "onnx is not installed" in r.stdout and (run / "student_int.npz").exists(), r.stderr
    r = subprocess.run([sys.executable, "tools/export.py", str(run), "--compare", "--data-dir", tiny_data], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "pip install onnx onnxruntime" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
