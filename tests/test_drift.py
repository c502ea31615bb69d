"""Result drift on real data: seed 0 of the smoke grid (CIFAR-10 W4A4, every method, the pretrained teacher, real
CIFAR-10) run now against the three smoke seeds committed under results/runs/smoke/ (tools/report.py --check). A
change that moves any method's accuracy beyond the committed seeds' spread fails here, in CI, without a training
budget. Opt-in like test_real_data.py: it needs CLEANQD_TEST_DATA and the chenyaofo teacher (conftest.teacher_path).

The band is the committed mean ± 3 std, never narrower than FLOOR: the smoke runs train for 4 steps, so seeds can
agree to a few hundredths and another CPU's (or thread count's) float rounding must not count as drift
(docs/reproduce.md gives the measured spread)."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TEACHER_HELP, teacher_path

sys.path.insert(0, os.path.join(ROOT, "tools"))
import grid  # noqa: E402
import report  # noqa: E402

DATA = os.environ.get("CLEANQD_TEST_DATA")
FLOOR = 1.0  # top-1 points
pytestmark = pytest.mark.skipif(not DATA, reason="drift check: set CLEANQD_TEST_DATA to a folder with the official "
                                                 "cifar-10-batches-py/")


@pytest.mark.slow
def test_smoke_grid_has_not_drifted_from_the_committed_runs(tmp_path):
    teacher, why = teacher_path("cifar10")
    if teacher is None:
        pytest.skip(f"drift check needs the pretrained teacher: {why}; {TEACHER_HELP}")
    tdir = tmp_path / "teachers"
    tdir.mkdir()
    (tdir / "cifar10_resnet20_chenyaofo.pth").symlink_to(os.path.abspath(teacher))
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(["bash", "run_all.sh", "--budget", "smoke", "--datasets", "cifar10", "--bits", "4", "--seeds",
                        "0", "--data-dir", DATA, "--teacher-dir", str(tdir), "--out-dir", str(tmp_path / "runs"),
                        "--results-dir", str(tmp_path / "results"), "--jobs", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    lines, drifted = report.check(report.collect(str(tmp_path / "runs")),
                                  report.collect(os.path.join(ROOT, "results", "runs")), margin=FLOOR, floor=FLOOR)
    text = "\n".join(lines)
    compared = [line for line in lines if line.startswith(("ok", "DRIFT"))]
    # every method of the grid was compared with three committed seeds (a lost or re-protocolled smoke cell fails)
    assert len(compared) == len(grid.methods()) and all("3 runs)" in line for line in compared), text
    assert drifted == 0, text
