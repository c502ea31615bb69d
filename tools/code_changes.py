"""Diagnostic: how many integer weight codes did training actually change? (runs of the ZeroQ-quantizer methods)

The student starts as a copy of the teacher, so its initial codes are the teacher's weights quantized. For a run's
last checkpoint this prints, per quantized layer and in total, the fraction of codes that differ, plus the mean
relative change of the float (shadow) weights and of BN gamma/beta.

    python tools/code_changes.py runs/RUN_DIR
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import NUM_CLASSES, CifarResNet, QConv2d, QLinear, load_teacher, quantize_model, weight_codes  # noqa: E402


def main(run_dir):
    if not all(os.path.isfile(os.path.join(run_dir, f)) for f in ("args.json", "checkpoint.pt")):
        print(f"code_changes.py: {run_dir} holds no args.json and checkpoint.pt: pass a run directory", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    teacher, _ = load_teacher(args["teacher"], args["dataset"], args.get("teacher_depth", 20))
    student = quantize_model(CifarResNet(args.get("teacher_depth", 20), NUM_CLASSES[args["dataset"]]),
                             args["wbits"], args["abits"])
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    student.load_state_dict(ckpt["student"])
    t_params = dict(teacher.named_parameters())
    changed = total = 0
    print(f"{'layer':28s} {'codes changed':>14s} {'rel. float change':>18s}")
    for name, m in student.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            w0 = t_params[name + ".weight"].detach()
            c0, c1 = weight_codes(w0, args["wbits"]), weight_codes(m.weight, args["wbits"])
            n = (c0 != c1).sum().item()
            changed, total = changed + n, total + c0.numel()
            rel = ((m.weight.detach() - w0).norm() / w0.norm()).item()
            print(f"{name:28s} {100 * n / c0.numel():13.3f}% {rel:18.2e}")
    bn = [(p.detach() - t_params[k].detach()).norm().item() / t_params[k].detach().norm().item()
          for k, p in student.named_parameters() if "bn" in k or "downsample.1" in k]
    print(f"total: {changed}/{total} weight codes changed ({100 * changed / total:.3f}%), after epoch "
          f"{ckpt['epochs_done']}; "
          f"BN gamma/beta mean relative change {sum(bn) / len(bn):.2e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run directory of gdfq.py, ait.py, akt.py, lrq.py or synq.py (its checkpoint.pt)")
    main(p.parse_args().run_dir)
