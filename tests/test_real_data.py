"""Real CIFAR and the pretrained teachers, end to end (opt-in: they are not part of the repository).
CLEANQD_TEST_DATA names a folder holding the official python-layout cifar-10-batches-py/ and cifar-100-python/; the
teachers are found as for the parity tests (conftest.teacher_path). The test splits must be the official 10,000
images, on which chenyaofo's ResNet-20s score their published 92.60 % and 68.83 % top-1 through gdfq.py --epochs 0."""
import json
import os

import pytest
from conftest import ROOT, TEACHER_HELP, run_script, teacher_path

DATA = os.environ.get("CLEANQD_TEST_DATA")
pytestmark = pytest.mark.skipif(not DATA, reason="real-data check: set CLEANQD_TEST_DATA to a folder with the official "
                                                 "cifar-10-batches-py/ and cifar-100-python/")


@pytest.mark.slow
@pytest.mark.parametrize("dataset,expected", [("cifar10", 92.60), ("cifar100", 68.83)])
def test_real_data_and_teacher_top1(tmp_path, dataset, expected):
    from common import load_cifar
    x, y = load_cifar(dataset, DATA, train=True, download=False)
    classes = 10 if dataset == "cifar10" else 100
    assert x.shape[1:] == (3, 32, 32) and x.dtype.is_floating_point is False and len(y) == len(x)
    assert sorted(set(y.tolist())) == list(range(classes)) and (dataset == "cifar100" or len(x) == 50000)
    x, y = load_cifar(dataset, DATA, train=False, download=False)
    assert len(x) == len(y) == 10000
    teacher, why = teacher_path(dataset)
    if teacher is None:
        pytest.skip(f"real-data check needs the pretrained teacher: {why}; {TEACHER_HELP}")
    r = run_script(["gdfq.py", "--dataset", dataset, "--data-dir", DATA, "--teacher", teacher, "--epochs", "0",
                    "--out-dir", str(tmp_path), "--run-name", "t"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert round(json.loads((tmp_path / "t" / "summary.json").read_text())["teacher_top1"], 2) == expected
