"""Make tests/fixtures/lrq/dkd_loss_f64.pt: the DKD reference (github.com/megvii-research/mdistiller, its
`mdistiller/distillers/DKD.py`, checked out by you) run in float64 on the inputs of dkd_loss.pt. Nothing of the
reference is in this file: it imports the reference's module from its checkout and calls its `dkd_loss`.

    python tools/lrq_parity.py /path/to/mdistiller tests/fixtures/lrq

Why float64: the float32 values in dkd_loss.pt carry the float32 rounding of the machine that made them. TCKD is a KL
over two bins of nearly equal distributions, so at T = 20 that rounding is up to 3e-3 of its value, and it changes
from one CPU to another (the reference's own float32 result differs by up to 1e-4 between an Intel Xeon and an AMD
EPYC). In float64 the function itself can be compared, to 1e-12, on any machine.
Patches: the package's `__init__` (which imports every distiller and their dependencies) is skipped by loading
`mdistiller.distillers` as a bare namespace; `size_average=False`, which this torch still accepts, is left as is.
"""
import importlib
import os
import sys
import types
import warnings

import torch


def load_reference(root):
    for name, path in (("mdistiller", os.path.join(root, "mdistiller")),
                       ("mdistiller.distillers", os.path.join(root, "mdistiller", "distillers"))):
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module
    return importlib.import_module("mdistiller.distillers.DKD").dkd_loss


def main(root, out):
    dkd_loss = load_reference(root)
    inputs = torch.load(os.path.join(out, "dkd_loss.pt"), weights_only=True)
    result = {}
    for c in (10, 100):
        for sat in ("", "sat/"):
            t = inputs[f"c{c}/t_saturated" if sat else f"c{c}/t"].double()
            y = inputs[f"c{c}/y"]
            for setting in ("default", "res56_res20", "gdfq_t"):
                alpha, beta, T = inputs[f"setting/{setting}"].tolist()
                key = f"c{c}/{sat}{setting}"
                s = inputs[f"c{c}/s"].double().requires_grad_(True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # size_average is deprecated
                    loss = dkd_loss(s, t, y, alpha, beta, T)
                    loss.backward()
                    result[f"{key}/loss"], result[f"{key}/grad_s"] = loss.detach(), s.grad
                    result[f"{key}/tckd"] = dkd_loss(s, t, y, 1.0, 0.0, T).detach()
                    result[f"{key}/nckd"] = dkd_loss(s, t, y, 0.0, 1.0, T).detach()
    torch.save(result, os.path.join(out, "dkd_loss_f64.pt"))
    print("wrote", os.path.join(out, "dkd_loss_f64.pt"), len(result), "tensors")


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print("usage: " + __doc__.strip())
        sys.exit(0)
    if (len(sys.argv) < 3 or not os.path.isfile(os.path.join(sys.argv[1], "mdistiller", "distillers", "DKD.py"))
            or not os.path.isfile(os.path.join(sys.argv[2], "dkd_loss.pt"))):
        print("error: usage: python tools/lrq_parity.py MDISTILLER_CHECKOUT FIXTURE_DIR (the checkout must hold "
              "mdistiller/distillers/DKD.py, FIXTURE_DIR dkd_loss.pt)", file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:3])
