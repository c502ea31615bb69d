"""Export a trained student as integers (numpy .npz) and as an ONNX QDQ model, and check that both compute what the
fake-quantized PyTorch student computes.

    python tools/export.py RUN_DIR                      # RUN_DIR/student_int.npz (+ student.onnx, if onnx is installed)
    python tools/export.py RUN_DIR --compare            # + top-1 of fake-quant, integer reference and ONNX Runtime
    python tools/export.py --int RUN_DIR/student_int.npz --data-dir ./data   # the integer reference alone (numpy)
    python tools/export.py RUN_DIR --bench              # ONNX Runtime images/s: the quantized graph vs the float one

RUN_DIR is a run directory (its model.pt from --save-model, else its last checkpoint.pt). The tool knows no method:
every quantized layer describes itself through the export contract in common.py (integer codes, scales, zero points,
rounding). Layout of the .npz (numpy only, no pickles): `meta` (JSON: the graph, bit-widths, every activation
quantizer, the input normalisation), per quantized layer `L.w_packed` (the codes' grid indices, `bits` bits each,
packed MSB first), `L.w_scale`, `L.w_zero`; float layers `L.weight`; `L.bias`; BatchNorm `B.gamma`, `B.beta`,
`B.mean`, `B.var` (kept as float: the integer reference folds them into the per-channel multiplier and bias of the
layer before). Docs: docs/deploy.md.
"""
import argparse
import json
import os
import sys
import time
import zipfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FORMAT = "cleanqd-int-1"


def die(msg):
    print(f"export.py: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# Bit packing: codes on a grid qmin, qmin + step, ..., qmax -> indices 0..2^bits-1 -> `bits` bits each, MSB first
def pack(codes, qmin, step, bits):
    idx = (codes - qmin) // step
    if (idx * step + qmin != codes).any() or idx.min() < 0 or idx.max() >= 2 ** bits:
        raise ValueError(f"codes off the {bits}-bit grid {qmin}, {qmin + step}, ...")
    planes = np.unpackbits(idx.astype(np.uint8).reshape(-1, 1), axis=1)[:, 8 - bits:]
    return np.packbits(planes.reshape(-1))


def unpack(packed, shape, qmin, step, bits):
    n = int(np.prod(shape))
    planes = np.unpackbits(packed)[:n * bits].reshape(n, bits)
    idx = (planes.astype(np.int64) << np.arange(bits - 1, -1, -1)).sum(1)
    return (idx * step + qmin).reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Export: walk the CIFAR ResNet (stem, blocks, classifier) and ask every layer for its quantizer
def layer_names(model):
    """The graph: stem (conv, bn, act), blocks (conv1, bn1, act1, conv2, bn2, [down conv, down bn], act2), fc."""
    blocks = []
    for li in (1, 2, 3):
        for bi, blk in enumerate(getattr(model, f"layer{li}")):
            p = f"layer{li}.{bi}"
            blocks.append({"conv1": f"{p}.conv1", "bn1": f"{p}.bn1", "act1": f"{p}.relu1", "conv2": f"{p}.conv2",
                           "bn2": f"{p}.bn2", "act2": f"{p}.relu2",
                           "down": [f"{p}.downsample.0", f"{p}.downsample.1"] if blk.downsample is not None else None})
    return {"stem": {"conv": "conv1", "bn": "bn1", "act": "relu"}, "blocks": blocks, "fc": "fc"}


def export_npz(model, meta, path):
    """Write the student (eval mode, quantizers frozen) as student_int.npz; returns (arrays, meta)."""
    import torch.nn as nn
    mods = dict(model.named_modules())
    arrays, layers, acts, bns = {}, {}, {}, {}
    for name, m in mods.items():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            info = {"kind": "conv" if isinstance(m, nn.Conv2d) else "linear", "shape": list(m.weight.shape)}
            if info["kind"] == "conv":
                info.update(stride=m.stride[0], padding=m.padding[0])
            if hasattr(m, "export_weight"):
                w = m.export_weight()
                codes = w["codes"].cpu().numpy()
                arrays[f"{name}.w_packed"] = pack(codes, w["qmin"], w["code_step"], w["bits"])
                arrays[f"{name}.w_scale"] = w["scale"].cpu().numpy().astype(np.float64)
                arrays[f"{name}.w_zero"] = w["zero"].cpu().numpy().astype(np.int32)
                info["weight"] = {k: w[k] for k in ("qmin", "qmax", "code_step", "bits", "out_scale", "quantizer")}
                info["weight"]["per_channel"] = arrays[f"{name}.w_scale"].size > 1
            else:
                arrays[f"{name}.weight"] = m.weight.detach().cpu().float().numpy()
                info["weight"] = None
            info["input"] = m.export_input() if hasattr(m, "export_input") else None
            if m.bias is not None:
                arrays[f"{name}.bias"] = m.bias.detach().cpu().float().numpy()
            layers[name] = info
        elif isinstance(m, nn.BatchNorm2d):
            for k, v in (("gamma", m.weight), ("beta", m.bias), ("mean", m.running_mean), ("var", m.running_var)):
                arrays[f"{name}.{k}"] = v.detach().cpu().float().numpy()
            bns[name] = {"eps": m.eps}
        elif hasattr(m, "export_act"):
            acts[name] = m.export_act()
    graph = {"arch": meta["arch"]} if meta.get("arch") else layer_names(model)  # torchvision's: its own graph
    meta = {**meta, "format": FORMAT, "graph": graph, "layers": layers, "acts": acts, "bns": bns}
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
    return arrays, meta


def load_npz(path):
    if not os.path.isfile(path):
        die(f"{path}: no such file (an integer export is RUN_DIR/student_int.npz, written by this tool)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # a .npz is a zip archive; an empty, truncated-at-0 or foreign file is not
        die(f"{path} is not a .npz archive ({'empty' if not head else 'no zip header'}): "
            "export the run again with python tools/export.py RUN_DIR")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        die(f"{path} is not a readable cleanqd integer export ({type(e).__name__}: {str(e)[:120]}); "
            "it may be truncated: export the run again")
    if meta.get("format") != FORMAT:
        die(f"{path} is not a cleanqd integer export ({FORMAT})")
    return arrays, meta


def weight_of(arrays, name, info):
    """(integer codes minus zero point (int64), per-output-channel multiplier (float64)) or (float weight, 1)."""
    w = info["weight"]
    if w is None:
        return arrays[f"{name}.weight"].astype(np.float64), np.ones(info["shape"][0])
    codes = unpack(arrays[f"{name}.w_packed"], info["shape"], w["qmin"], w["code_step"], w["bits"])
    zero, scale = arrays[f"{name}.w_zero"].astype(np.int64), arrays[f"{name}.w_scale"]
    co = info["shape"][0]
    zero = np.broadcast_to(zero, (co,)).reshape((co,) + (1,) * (codes.ndim - 1))
    return codes - zero, np.broadcast_to(scale, (co,)) * w["out_scale"]


# ----------------------------------------------------------------------------------------------------------
# The integer reference: numpy only, from the .npz alone. Activations travel as integer codes with their step and
# zero point; each layer multiplies integer codes by integer weights, accumulates exactly (int64, checked to fit
# int32), then applies one float multiplier and bias per output channel (scales x BatchNorm), as a deployment would.
def quantize(x, q):
    """codes = clamp(R((relu?(x) - offset) / step) + zero, qmin, qmax), R = round-half-even or ceil."""
    if q["relu"]:
        x = np.maximum(x, 0)
    u = (x - q["offset"]) / q["step"]
    u = np.ceil(u) if q["rounding"] == "ceil" else np.round(u)
    return np.clip(u + q["zero"], q["qmin"], q["qmax"]).astype(np.int64)


class Act:
    """A tensor between layers: its float value, and (when an activation quantizer made it) its integer codes."""

    def __init__(self, value, codes=None, q=None):
        self.value, self.codes, self.q = value, codes, q

    @classmethod
    def quantized(cls, x, q):
        codes = quantize(x, q)
        return cls(q["out_step"] * (codes - q["out_zero"]), codes, q)


def conv_acc(x, w, stride, pad):
    """Exact sum of products over [N,C,H,W] x [Co,C,k,k] (im2col; float64 BLAS, exact for these integer sizes)."""
    n, c, h, wd = x.shape
    co, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    s = xp.strides
    cols = np.lib.stride_tricks.as_strided(xp, (n, ho, wo, c, k, k),
                                           (s[0], s[2] * stride, s[3] * stride, s[1], s[2], s[3]))
    out = cols.reshape(n * ho * wo, c * k * k).astype(np.float64) @ w.reshape(co, -1).T.astype(np.float64)
    return out.reshape(n, ho, wo, co).transpose(0, 3, 1, 2)


def int_layer(arrays, meta, name, x, bn=None):
    """One conv (or linear) + its BatchNorm on an Act: integer codes x integer weights where both are integers."""
    info = meta["layers"][name]
    if info["input"] is not None:  # the layer quantizes its own input
        x = Act.quantized(x.value, info["input"])
    if x.codes is not None:
        a, a_mult = x.codes - x.q["out_zero"], x.q["out_step"]
    else:  # float input (the image, the pooled feature)
        a, a_mult = x.value, 1.0
    w, w_mult = weight_of(arrays, name, info)
    if info["kind"] == "conv":
        acc = conv_acc(a, w, info["stride"], info["padding"])
    else:
        acc = a.astype(np.float64) @ w.T.astype(np.float64)
    if x.codes is not None and info["weight"] is not None:  # integer x integer: exact, and within int32
        assert np.abs(acc).max() < 2 ** 31 and (acc == np.round(acc)).all()
        acc = acc.astype(np.int32)
    mult, bias = a_mult * w_mult, arrays.get(f"{name}.bias", np.zeros(info["shape"][0])).astype(np.float64)
    if bn is not None:  # BatchNorm folded into the per-channel multiplier and bias
        g = arrays[f"{bn}.gamma"] / np.sqrt(arrays[f"{bn}.var"].astype(np.float64) + meta["bns"][bn]["eps"])
        mult, bias = mult * g, (bias - arrays[f"{bn}.mean"]) * g + arrays[f"{bn}.beta"]
    shape = (1, -1, 1, 1) if info["kind"] == "conv" else (1, -1)
    return acc * mult.reshape(shape) + bias.reshape(shape)


def act(meta, name, y):
    q = meta["acts"].get(name)
    return Act.quantized(y, q) if q is not None else Act(np.maximum(y, 0))


def producers(meta):
    """{layer: the activation quantizer whose codes it consumes} (layers fed by the image or the pooled feature, or
    quantizing their own input, are absent)."""
    g, out = meta["graph"], {}
    prev = g["stem"]["act"]
    for b in g["blocks"]:
        out[b["conv1"]], out[b["conv2"]] = prev, b["act1"]
        if b["down"]:
            out[b["down"][0]] = prev
        prev = b["act2"]
    return {k: v for k, v in out.items() if v in meta["acts"] and meta["layers"][k]["input"] is None}


def bn_after(meta, name):
    """The BatchNorm that follows a layer in the graph (None for the classifier)."""
    g = meta["graph"]
    pairs = [(g["stem"]["conv"], g["stem"]["bn"])]
    for b in g["blocks"]:
        pairs += [(b["conv1"], b["bn1"]), (b["conv2"], b["bn2"])] + ([tuple(b["down"])] if b["down"] else [])
    return dict(pairs).get(name)


def int_forward(arrays, meta, x):
    """Logits of normalised images x [N,3,32,32] (float) by integer arithmetic, from the .npz alone."""
    g = meta["graph"]
    t = act(meta, g["stem"]["act"], int_layer(arrays, meta, g["stem"]["conv"], Act(x), g["stem"]["bn"]))
    for b in g["blocks"]:
        h = act(meta, b["act1"], int_layer(arrays, meta, b["conv1"], t, b["bn1"]))
        body = int_layer(arrays, meta, b["conv2"], h, b["bn2"])
        short = int_layer(arrays, meta, b["down"][0], t, b["down"][1]) if b["down"] else t.value
        t = act(meta, b["act2"], body + short)
    return int_layer(arrays, meta, g["fc"], Act(t.value.mean((2, 3))))


# ----------------------------------------------------------------------------------------------------------
# Back to PyTorch from the .npz alone: a CifarResNet whose weights are the dequantized codes and whose quantizers
# are fixed quantize-dequantize steps (a check that the file holds the whole student)
def torch_student(arrays, meta):
    import torch
    import torch.nn as nn
    sys.path.insert(0, ROOT)
    from common import CifarResNet, imagenet_model

    class QDQ(nn.Module):
        def __init__(self, q):
            super().__init__()
            self.q = q

        def forward(self, x):
            q = self.q
            x = torch.relu(x) if q["relu"] else x
            x = x.clamp(max=q["clip"]) if "clip" in q else x  # in a ReLU6's place
            u = (x - q["offset"]) / q["step"]
            u = torch.ceil(u) if q["rounding"] == "ceil" else torch.round(u)
            return (u + q["zero"]).clamp(q["qmin"], q["qmax"]).sub(q["out_zero"]).mul(q["out_step"])

    class Scaled(nn.Sequential):  # a layer whose output is multiplied by a float (out_scale), as the method does
        def __init__(self, layer, s):
            super().__init__(layer)
            self.s = s

        def forward(self, x):
            return super().forward(x) * self.s

    model = imagenet_model(meta["arch"], meta["num_classes"]) if meta.get("arch") else \
        CifarResNet(meta["depth"], meta["num_classes"])
    state = {}
    for name, info in meta["layers"].items():
        w, mult = weight_of(arrays, name, info)
        if info["weight"] is not None:
            mult = mult / info["weight"]["out_scale"]
        state[f"{name}.weight"] = torch.from_numpy((w * mult.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32))
        if f"{name}.bias" in arrays:
            state[f"{name}.bias"] = torch.from_numpy(arrays[f"{name}.bias"])
    for name in meta["bns"]:
        for k, key in (("gamma", "weight"), ("beta", "bias"), ("mean", "running_mean"), ("var", "running_var")):
            state[f"{name}.{key}"] = torch.from_numpy(arrays[f"{name}.{k}"])
    model.load_state_dict(state, strict=False)  # num_batches_tracked is not needed in eval mode
    mods = dict(model.named_modules())
    for name, q in meta["acts"].items():  # activation quantizers in the ReLUs' places
        parent, _, attr = name.rpartition(".")
        setattr(mods[parent] if parent else model, attr, QDQ(q))
    for name, info in meta["layers"].items():  # layers that quantize their own input or scale their output
        layer = mods[name]
        if info["weight"] is not None and info["weight"]["out_scale"] != 1.0:
            layer = Scaled(layer, info["weight"]["out_scale"])
        if info["input"] is not None:
            layer = nn.Sequential(QDQ(info["input"]), layer)
        parent, _, attr = name.rpartition(".")
        setattr(mods[parent] if parent else model, attr, layer)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# ONNX: the same network with QuantizeLinear/DequantizeLinear around every quantized tensor, built from the .npz
def container(lo, hi):
    import onnx
    for t, a, b in ((onnx.TensorProto.UINT8, 0, 255), (onnx.TensorProto.INT8, -128, 127),
                    (onnx.TensorProto.INT16, -32768, 32767)):
        if a <= lo and hi <= b:
            return t, {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
                       onnx.TensorProto.INT16: np.int16}[t]
    raise ValueError(f"no integer container holds {lo}..{hi}")


def build_onnx(arrays, meta, quantized=True):
    """The ONNX model (opset 21). quantized=False: the same graph with float weights w_hat and plain ReLUs (the
    float reference for speed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes, inits = [], []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, out, **kw):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **kw))
        return out

    def qdq(x, q, name):  # an activation quantizer: [Relu] [Sub offset] [Add step/2 for ceil] Clip Q DQ
        if q["relu"]:
            x = node("Relu", [x], f"{name}.relu")
        if not quantized:
            return x
        if q["offset"]:
            x = node("Sub", [x, const(f"{name}.offset", q["offset"])], f"{name}.sub")
        if q["rounding"] == "ceil":  # ceil(u) = round(u + 1/2) except where u is an exact integer
            x = node("Add", [x, const(f"{name}.half", 0.5 * q["step"])], f"{name}.half_step")
        lo = min(q["qmin"], q["out_zero"], q["zero"])
        hi = max(q["qmax"], q["out_zero"], q["zero"])
        tcode, ncode = container(lo, hi)
        x = node("Clip", [x, const(f"{name}.lo", (q["qmin"] - q["zero"]) * q["step"]),
                          const(f"{name}.hi", (q["qmax"] - q["zero"]) * q["step"])], f"{name}.clip")
        x = node("QuantizeLinear", [x, const(f"{name}.step", q["step"]), const(f"{name}.zp", q["zero"], ncode)],
                 f"{name}.q")
        zp_out = f"{name}.out_zp"
        const(zp_out, q["out_zero"], ncode)
        return node("DequantizeLinear", [x, const(f"{name}.out_step", q["out_step"]), zp_out], f"{name}.dq")

    def layer(x, name, bn=None):
        info = meta["layers"][name]
        if info["input"] is not None:
            x = qdq(x, info["input"], f"{name}.in")
        w = info["weight"]
        if w is None:
            wname = const(f"{name}.weight", arrays[f"{name}.weight"])
        else:
            codes = unpack(arrays[f"{name}.w_packed"], info["shape"], w["qmin"], w["code_step"], w["bits"])
            zero, scale = arrays[f"{name}.w_zero"], arrays[f"{name}.w_scale"]
            if quantized:
                _, ncode = container(min(w["qmin"], zero.min()), max(w["qmax"], zero.max()))
                per = w["per_channel"]
                wname = node("DequantizeLinear", [const(f"{name}.codes", codes, ncode),
                                                  const(f"{name}.scale", scale if per else scale[0]),
                                                  const(f"{name}.zero", zero if per else zero[0], ncode)],
                             f"{name}.w_hat", axis=0)
            else:
                co = info["shape"][0]
                deq = (codes - zero.reshape((-1,) + (1,) * (codes.ndim - 1))) * np.broadcast_to(scale, (co,)).reshape(
                    (-1,) + (1,) * (codes.ndim - 1))
                wname = const(f"{name}.weight", deq)
        ins = [x, wname] + ([const(f"{name}.bias", arrays[f"{name}.bias"])] if f"{name}.bias" in arrays else [])
        if info["kind"] == "conv":
            p = info["padding"]
            y = node("Conv", ins, name, strides=[info["stride"]] * 2, pads=[p] * 4)
        else:
            y = node("Gemm", ins, name, transB=1)
        if w is not None and w["out_scale"] != 1.0:
            y = node("Mul", [y, const(f"{name}.out_scale", w["out_scale"])], f"{name}.scaled")
        if bn is not None:
            y = node("BatchNormalization", [y] + [const(f"{bn}.{k}", arrays[f"{bn}.{k}"]) for k in
                                                  ("gamma", "beta", "mean", "var")], bn,
                     epsilon=meta["bns"][bn]["eps"])
        return y

    def activation(x, name):
        q = meta["acts"].get(name)
        return qdq(x, q, name) if q is not None else node("Relu", [x], name)

    g = meta["graph"]
    t = activation(layer("input", g["stem"]["conv"], g["stem"]["bn"]), g["stem"]["act"])
    for b in g["blocks"]:
        h = activation(layer(t, b["conv1"], b["bn1"]), b["act1"])
        body = layer(h, b["conv2"], b["bn2"])
        short = layer(t, b["down"][0], b["down"][1]) if b["down"] else t
        t = activation(node("Add", [body, short], f"{b['act2']}.add"), b["act2"])
    pooled = node("Flatten", [node("GlobalAveragePool", [t], "pool")], "pool.flat")
    layer(pooled, g["fc"])
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(nodes, "cleanqd_student", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", meta["num_classes"]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="cleanqd")
    model.ir_version = 10
    model.graph.input[0].doc_string = INPUT_DOC.format(**meta)
    helper.set_model_props(model, {k: str(v) for k, v in onnx_metadata(meta).items()})
    onnx.checker.check_model(model)
    return model


INPUT_DOC = ("float32 [N, 3, 32, 32], RGB, channels first: pixel / 255, then (x - mean) / std per channel, "
             "mean {mean}, std {std}")


def onnx_metadata(meta):
    """What a user of the .onnx alone needs to feed it (the model's metadata_props): layout, scaling, mean, std,
    class count, and what the quantized student is."""
    return {"input_layout": "NCHW", "input_shape": "N,3,32,32", "input_channels": "RGB", "input_scale": "1/255",
            "input_mean": json.dumps(meta["mean"]), "input_std": json.dumps(meta["std"]),
            "preprocessing": "x = (uint8_rgb_image / 255 - mean) / std, per channel, NCHW float32",
            "num_classes": meta["num_classes"], "output": "logits [N, num_classes]",
            "method": meta.get("method", "?"), "wbits": meta.get("wbits", "?"), "abits": meta.get("abits", "?")}


def ort_session(model_bytes, threads=0):
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def batched(fn, x, batch=500):
    return np.concatenate([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def need(module):
    try:
        return __import__(module)
    except ImportError:
        die(f"{module} is not installed (an optional extra): pip install onnx onnxruntime")


# ----------------------------------------------------------------------------------------------------------
def test_images(meta, data_dir, limit=0):
    sys.path.insert(0, ROOT)
    from common import load_cifar, normalise
    x, y = load_cifar(meta["dataset"], data_dir, train=False)
    if limit:
        x, y = x[:limit], y[:limit]
    return normalise(x, meta["mean"], meta["std"]).numpy(), y.numpy()


def near_ties(ref, other):
    """(images whose predicted class differs, how many of those are near-ties): a near-tie is an image whose top-two
    gap in `ref` is at most twice the largest logit difference between the two evaluations on that image, i.e. one
    that float rounding (directly, or by moving an activation across a rounding boundary) can swap."""
    diff = np.nonzero(ref.argmax(1) != other.argmax(1))[0]
    top2 = np.sort(ref[diff], 1)[:, -2:]
    return int(len(diff)), int((top2[:, 1] - top2[:, 0] <= 2 * np.abs(ref[diff] - other[diff]).max(1)).sum())


def size_table(arrays, meta):
    """Bytes: the packed integer weights (+ their scales and zero points) and the whole student vs float32."""
    float_bytes = packed = aux = other = 0
    for name, info in meta["layers"].items():
        n = int(np.prod(info["shape"]))
        float_bytes += 4 * n
        if info["weight"] is None:
            other += 4 * n
        else:
            packed += arrays[f"{name}.w_packed"].nbytes
            aux += 4 * (arrays[f"{name}.w_scale"].size + arrays[f"{name}.w_zero"].size)
    rest = sum(v.nbytes for k, v in arrays.items() if k.endswith(("bias", "gamma", "beta", "mean", "var")))
    return {"float32_weights": float_bytes, "float32_model": float_bytes + rest, "packed_weights": packed,
            "scales_zero_points": aux, "float_layers": other, "int_model": packed + aux + other + rest}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", nargs="?",
                   help="a run directory: its model.pt (--save-model), else its last checkpoint.pt")
    p.add_argument("--int", metavar="NPZ", help="only evaluate the integer reference of this .npz (numpy only)")
    p.add_argument("--compare", action="store_true",
                   help="evaluate fake-quant (PyTorch), integer reference and ONNX Runtime on the test split")
    p.add_argument("--bench", action="store_true", help="ONNX Runtime images/s: quantized graph vs float graph")
    p.add_argument("--no-onnx", action="store_true", help="write the .npz only")
    p.add_argument("--data-dir", default="./data", help="CIFAR folder (for --compare / --int)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N test images (0: all)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: default)")
    a = p.parse_args(argv)
    if a.int:
        if not os.path.isfile(a.int):
            die(f"--int {a.int}: no such file")
        arrays, meta = load_npz(a.int)
        x, y = test_images(meta, a.data_dir, a.limit)
        logits = batched(lambda b: int_forward(arrays, meta, b), x, 100)
        print(f"integer reference top-1 {100.0 * (logits.argmax(1) == y).mean():.2f} on {len(y)} test images")
        return
    if not a.run_dir:
        die("give a RUN_DIR (or --int NPZ)")
    if not os.path.isdir(a.run_dir):
        die(f"{a.run_dir}: no such run directory")
    sys.path.insert(0, ROOT)
    import torch
    from common import UserError, load_run_student
    if a.threads:
        torch.set_num_threads(a.threads)
    saved = any(os.path.isfile(os.path.join(a.run_dir, f)) for f in ("model.pt", "checkpoint.pt"))
    if saved and not os.path.isfile(os.path.join(a.run_dir, "args.json")):
        die(f"{a.run_dir} has no args.json (the run's settings): pass the run directory the script wrote")
    try:
        model, mean, std = load_run_student(a.run_dir)
    except UserError as e:
        die(str(e))
    except (KeyError, TypeError) as e:
        die(f"{a.run_dir}: its model.pt or checkpoint.pt was not written by a cleanqd script (missing {e})")
    with open(os.path.join(a.run_dir, "args.json")) as f:
        run_args = json.load(f)
    meta = {"method": run_args["method"], "dataset": run_args["dataset"], "wbits": run_args["wbits"],
            "abits": run_args["abits"], "num_classes": model.num_classes, "depth": model.depth,
            "arch": getattr(model, "arch", None),
            "mean": list(mean), "std": list(std), "input": "images normalised with mean/std, [N,3,32,32] float"}
    npz = os.path.join(a.run_dir, "student_int.npz")
    try:
        arrays, meta = export_npz(model, meta, npz)
    except ValueError as e:
        die(f"cannot export {a.run_dir}: {e}")
    sizes = size_table(arrays, meta)
    print(f"wrote {npz}: packed weights {sizes['packed_weights']} B (+{sizes['scales_zero_points']} B scales/zero "
          f"points, {sizes['float_layers']} B float layers) vs {sizes['float32_weights']} B float32; whole student "
          f"{sizes['int_model']} B vs {sizes['float32_model']} B")
    arrays, meta = load_npz(npz)  # everything below reads the file, as a deployment would
    if meta.get("arch"):  # an ImageNet student: the file is checked by rebuilding the student from it alone
        import torch
        x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (torch_student(arrays, meta)(x) - model(x)).abs().max().item()
        print(f"rebuilt the {meta['arch']} student from {npz} alone: max |logit diff| {diff:.2e} against the "
              "fake-quantized one on 4 random images")
        print(f"note: the numpy integer reference and the ONNX graph cover the CIFAR ResNet only: {meta['arch']} is "
              "exported as student_int.npz (every integer code, scale and zero point)")
        with open(os.path.join(a.run_dir, "export.json"), "w") as f:
            json.dump({"run_dir": a.run_dir, "method": meta["method"], "arch": meta["arch"], "wbits": meta["wbits"],
                       "abits": meta["abits"], "sizes": sizes, "npz_rebuild_max_abs_logit_diff": diff}, f, indent=1)
        return
    report = {"run_dir": a.run_dir, "method": meta["method"], "wbits": meta["wbits"], "abits": meta["abits"],
              "sizes": sizes}
    onnx_path = os.path.join(a.run_dir, "student.onnx")
    if not a.no_onnx:
        try:
            import onnx
        except ImportError:
            if a.compare or a.bench:
                need("onnx")
            print("onnx is not installed (an optional extra): wrote the .npz only; pip install onnx onnxruntime for "
                  "student.onnx")
        else:
            onnx.save(build_onnx(arrays, meta), onnx_path)
            print(f"wrote {onnx_path}")
    if a.compare:
        x, y = test_images(meta, a.data_dir, a.limit)
        with torch.no_grad():
            fake = batched(lambda b: model(torch.from_numpy(b)).numpy(), x)
        integer = batched(lambda b: int_forward(arrays, meta, b), x, 100)
        evals = {"fake_quant": fake, "integer": integer}
        if not a.no_onnx:
            need("onnxruntime")
            sess = ort_session(open(onnx_path, "rb").read(), a.threads)
            evals["onnxruntime"] = batched(lambda b: sess.run(None, {"input": b})[0], x)
        report["test_images"] = len(y)
        for k, v in evals.items():
            report[f"{k}_top1"] = round(100.0 * float((v.argmax(1) == y).mean()), 2)
            if k != "fake_quant":
                d, close = near_ties(fake, v)
                report[f"{k}_disagreements"], report[f"{k}_disagreements_near_ties"] = d, close
                report[f"{k}_max_abs_logit_diff"] = float(np.abs(fake - v).max())
                report[f"{k}_images_equal_logits"] = int((np.abs(fake - v).max(1) <= 1e-4 * np.abs(fake).max()).sum())
        print("  ".join(f"{k} {report[f'{k}_top1']:.2f}" for k in evals) + f"  ({len(y)} test images)")
        for k in evals:
            if k != "fake_quant":
                print(f"  {k} vs fake_quant: {report[f'{k}_disagreements']} predictions differ "
                      f"({report[f'{k}_disagreements_near_ties']} of them near-ties); logits equal to float rounding "
                      f"on {report[f'{k}_images_equal_logits']} images, max |logit diff| "
                      f"{report[f'{k}_max_abs_logit_diff']:.2e}")
    if a.bench:
        need("onnxruntime")
        x = np.random.default_rng(0).standard_normal((100, 3, 32, 32)).astype(np.float32)
        sessions = {"quantized": ort_session(build_onnx(arrays, meta).SerializeToString(), a.threads),
                    "float": ort_session(build_onnx(arrays, meta, quantized=False).SerializeToString(), a.threads)}
        best = {k: float("inf") for k in sessions}
        for _ in range(5):  # alternating, best of 5 rounds of 5 batches each
            for k, s in sessions.items():
                s.run(None, {"input": x})
                t0 = time.perf_counter()
                for _ in range(5):
                    s.run(None, {"input": x})
                best[k] = min(best[k], (time.perf_counter() - t0) / 500)
        report["bench"] = {k: round(1 / v, 1) for k, v in best.items()}
        report["bench"]["threads"] = a.threads or "default"
        print(f"ONNX Runtime, batch 100: quantized {1 / best['quantized']:.0f} img/s, float {1 / best['float']:.0f} "
              f"img/s, ratio {best['float'] / best['quantized']:.2f}")
    path = os.path.join(a.run_dir, "export.json")
    if os.path.isfile(path):  # keep what an earlier --compare or --bench measured
        with open(path) as f:
            report = {**json.load(f), **report}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
