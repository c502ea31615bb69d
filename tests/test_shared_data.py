"""Integration with ../shared (skipped when absent): the real CIFAR copies load and the shared teachers score
their published top-1 through gdfq.py --epochs 0."""
import json
import os
import subprocess

import pytest

from conftest import ROOT, SHARED, run_script

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "data")), reason="../shared not present")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    local = os.path.join(ROOT, "data")
    if all(os.path.isdir(os.path.join(local, d)) for d in ("cifar-10-batches-py", "cifar-100-python")):
        return local
    d = str(tmp_path_factory.mktemp("shared_data"))
    for name in ("cifar-10-python.tar.xz", "cifar-100-python.tar.xz"):
        subprocess.run(["tar", "-xJf", os.path.join(SHARED, "data", name), "-C", d], check=True)
    return d


@pytest.mark.parametrize("dataset,expected,n_train", [("cifar10", 92.60, 50000), ("cifar100", 68.83, 25000)])
def test_shared_teacher_top1(shared_data, tmp_path, dataset, expected, n_train):
    from common import load_cifar
    x, y = load_cifar(dataset, shared_data, train=True)
    assert x.shape == (n_train, 3, 32, 32) and x.dtype.is_floating_point is False and len(y) == n_train
    teacher = os.path.join(SHARED, "teachers", f"{dataset}_resnet20_chenyaofo.pth")
    r = run_script(["gdfq.py", "--dataset", dataset, "--data-dir", shared_data, "--teacher", teacher, "--epochs", "0",
                    "--out-dir", str(tmp_path), "--run-name", "t"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert round(json.loads((tmp_path / "t" / "summary.json").read_text())["teacher_top1"], 2) == expected
