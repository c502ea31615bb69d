"""No host synchronisation per training iteration, in any script (what a GPU run needs to keep its queue full).

Each script runs in-process under a dispatch mode that counts the operations which make a GPU wait for the host:
reading a value (`.item()`, `bool(t)`, `float(t)`), data-dependent shapes (`nonzero`, boolean-mask indexing,
`masked_select`, `unique`), and tensors built from Python data (`torch.tensor(...)`, a host-to-device copy on a
GPU). Runs with 2 and with 4 iterations per epoch must count the same: whatever syncs remain happen once per epoch
(logging, evaluation, checkpoint), never per iteration. On CUDA, `torch.cuda.set_sync_debug_mode` is the direct check.
"""
import os
import runpy
import signal
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "equal",
           "is_nonzero", "lift_fresh", "lift_fresh_copy", "repeat_interleave"}


def in_torch_optimizer():
    """Whether the nearest caller (past torch's tensor plumbing) is torch.optim's own code: its non-capturable
    optimizers (Adam) keep their step counters on the CPU by design, so reading them never waits for a GPU. Our own
    optimizers (AIT's GI) run under torch.optim's step wrapper too, but are their own nearest caller."""
    f, torch_dir, optim_dir = sys._getframe(2), f"{os.sep}torch{os.sep}", f"{os.sep}torch{os.sep}optim{os.sep}"
    while f is not None and torch_dir in f.f_code.co_filename and optim_dir not in f.f_code.co_filename:
        f = f.f_back  # the dispatcher and tensor plumbing
    return f is not None and optim_dir in f.f_code.co_filename


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and in_torch_optimizer():
            return func(*args, **(kwargs or {}))  # Adam's step counters live on the CPU even in a GPU run
        if name in SYNCING or (name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_syncs(script, argv):
    """Run `script` with `argv` in this process; the syncing operations it dispatched, by name."""
    saved_argv, saved_hook = sys.argv, sys.excepthook
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # the scripts install theirs
    sys.argv = [script, *argv]
    try:
        with CountSyncs() as mode:
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            except SystemExit as e:
                assert e.code in (0, None), f"{script} exited with {e.code}"
    finally:
        sys.argv, sys.excepthook = saved_argv, saved_hook
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
    return mode.counts


GEN = ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--milestones-from", "train", "--threads", "1"]
CASES = {  # script, extra flags, (flags for n iterations per epoch)
    "gdfq": ("gdfq.py", [], lambda n: ["--iters-per-epoch", str(n)]),
    "ait": ("ait.py", ["--gi-search", "batched"], lambda n: ["--iters-per-epoch", str(n)]),
    "akt": ("akt.py", [], lambda n: ["--iters-per-epoch", str(n)]),
    "akt-gdfq": ("akt.py", ["--base", "gdfq"], lambda n: ["--iters-per-epoch", str(n)]),
    "lrq": ("lrq.py", [], lambda n: ["--iters-per-epoch", str(n)]),
    "faqd": ("faqd.py", ["--epochs", "1", "--batch-size", "4", "--threads", "1"],
             lambda n: ["--train-subset", str(4 * n)]),
    "faqd-ffa": ("faqd.py", ["--epochs", "1", "--batch-size", "4", "--threads", "1", "--fa-type", "ffa"],
                 lambda n: ["--train-subset", str(4 * n)]),
    "sqakd": ("sqakd.py", ["--epochs", "1", "--batch-size", "4", "--threads", "1"],
              lambda n: ["--train-subset", str(4 * n)]),
    # the synthesis stage reads its loss once per Adam step (the plateau rule), a fixed number here
    "synq": ("synq.py", ["--num-images", "8", "--syn-batch", "4", "--syn-iters", "2"],
             lambda n: ["--iters-per-epoch", str(n)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_sync_per_iteration(case, tiny_data, teachers, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANQD_OFFLINE", "1")
    script, extra, iters = CASES[case]
    base = ["--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path), "--device", "cpu"]
    gen = GEN if script in ("gdfq.py", "ait.py", "akt.py", "lrq.py", "synq.py") else []
    two = count_syncs(script, base + gen + extra + iters(2) + ["--run-name", "two"])
    four = count_syncs(script, base + gen + extra + iters(4) + ["--run-name", "four"])
    assert sum(two.values()) > 0  # the counter sees the per-epoch ones (else this test could not fail)
    assert four == two, f"per-iteration syncs in {script}: {dict(four - two)}"


@pytest.mark.slow
def test_the_counter_catches_a_per_iteration_sync(tiny_data, teachers, tmp_path, monkeypatch):
    """AIT's sequential alpha search reads a value per candidate: the counter must see it grow with the iterations."""
    monkeypatch.setenv("CLEANQD_OFFLINE", "1")
    base = ["--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path), "--device", "cpu",
            *GEN, "--gi-search", "sequential"]
    two = count_syncs("ait.py", base + ["--iters-per-epoch", "2", "--run-name", "two"])
    four = count_syncs("ait.py", base + ["--iters-per-epoch", "4", "--run-name", "four"])
    assert four["_local_scalar_dense"] > two["_local_scalar_dense"] + 100  # 22 tensors x several candidates each
