"""A run carries the code that made it, a copied method owns its name and numbers, and every entry point answers
--help and fails in one line: RUN_DIR/code/ and summary.json's code_sha256, provenance that counts an uncommitted
copy as dirty, tools/code_diff.py, GRID's paper_for, tools/grid.py on module constants and malformed GRIDs, --track
(W&B, offline) and `--help` of every script, tool and benchmark."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_script
from test_new_method import TINY

ENTRY_POINTS = sorted(os.path.relpath(p, ROOT) for pattern in ("*.py", "tools/*.py", "benchmarks/*.py")
                      for p in glob.glob(os.path.join(ROOT, pattern)) if not p.endswith("common.py"))


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS + ["run_all.sh"])
def test_every_entry_point_answers_help(entry):
    cmd = ["bash", entry, "--help"] if entry.endswith(".sh") else [sys.executable, entry, "--help"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage" in (r.stdout + r.stderr).lower(), (entry, r.stdout[-300:], r.stderr[-500:])
    assert "Traceback" not in r.stderr, r.stderr


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def checkout(tmp_path):
    """A git checkout holding common.py, the method scripts and tools/, committed."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in glob.glob(os.path.join(ROOT, "*.py")):
        shutil.copy(name, work)
    shutil.copytree(os.path.join(ROOT, "tools"), work / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    git(work, "init", "-q")
    git(work, "add", ".")
    git(work, "commit", "-qm", "c")
    return work


def copy_of_gdfq(work, name="mymethod"):
    """gdfq.py copied under a new name, not committed, its variant() reading a module-level constant."""
    src = open(os.path.join(ROOT, "gdfq.py")).read()
    src = src.replace('METHOD = method_name(__file__)', 'SUFFIX = ""  # a module constant that variant() reads\n'
                      'METHOD = method_name(__file__)', 1)
    src = src.replace('    return METHOD\n', '    return METHOD + SUFFIX\n', 1)
    assert "METHOD + SUFFIX" in src
    (work / f"{name}.py").write_text(src)


@pytest.mark.slow
def test_an_uncommitted_copy_names_its_code_and_shows_no_other_methods_numbers(tiny_data, teachers, tmp_path):
    work = checkout(tmp_path)
    copy_of_gdfq(work)
    runs = tmp_path / "results" / "runs" / "short"
    r = run_script(["mymethod.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(runs),
                    "--run-name", "a", "--threads", "1", *TINY["zero-shot"]], cwd=work)
    assert r.returncode == 0, r.stderr
    run = runs / "a"
    assert (run / "code" / "mymethod.py").read_bytes() == (work / "mymethod.py").read_bytes()
    assert (run / "code" / "common.py").read_bytes() == (work / "common.py").read_bytes()
    s = json.loads((run / "summary.json").read_text())
    import hashlib
    assert s["code_sha256"]["mymethod.py"] == hashlib.sha256((work / "mymethod.py").read_bytes()).hexdigest()
    p = s["provenance"]
    assert p["git_dirty"] is True and p["git_untracked"] >= 1 and p["git_modified"] == 0, p
    # the report: the copy's row carries no GDFQ number, and variant() with a module constant is read
    r = subprocess.run([sys.executable, "tools/report.py", "--runs", str(tmp_path / "results" / "runs"), "--out",
                        str(tmp_path / "R.md"), "--plot", str(tmp_path / "p.png")], cwd=work, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    row = next(x for x in (tmp_path / "R.md").read_text().splitlines() if x.startswith("| mymethod |"))
    assert "GDFQ" not in row and "90.25" not in row, row
    # the code difference between two runs, from their saved copies
    shutil.copytree(run, runs / "b")
    edited = (runs / "b" / "code" / "mymethod.py").read_text().replace('"--lr-s", type=float, default=1e-4',
                                                                       '"--lr-s", type=float, default=2e-4')
    (runs / "b" / "code" / "mymethod.py").write_text(edited)
    r = subprocess.run([sys.executable, "tools/code_diff.py", str(run), str(runs / "b")], cwd=work,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "-    p.add_argument(\"--lr-s\", type=float, default=1e-4" in r.stdout, r.stdout
    assert "+    p.add_argument(\"--lr-s\", type=float, default=2e-4" in r.stdout
    r = subprocess.run([sys.executable, "tools/code_diff.py", str(run), str(run)], cwd=work, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.startswith("the same code"), r.stdout
    r = subprocess.run([sys.executable, "tools/code_diff.py", str(run), str(tmp_path)], cwd=work, capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_paper_numbers_belong_to_paper_for(tmp_path):
    """A renamed copy keeps GRID's numbers in its text but shows none: they are keyed to paper_for."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import grid
    for name in ("gdfq.py", "common.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    copy_of_gdfq(tmp_path)
    found = grid.methods(str(tmp_path))
    assert found["gdfq"]["paper"]["cifar10 W4A4"] == [90.25, "GDFQ paper"]
    assert "paper" not in found["mymethod"] and found["mymethod"]["kind"] == "zero-shot"
    assert grid.label({"method": "mymethod"}, str(tmp_path)) == "mymethod"  # variant() read SUFFIX


@pytest.mark.parametrize("edit,words", [
    (('"kind": "zero-shot"', '"kind": "zeroshot"'), "GRID field 'kind'"),
    (('"bits": [3, 4, 5]', '"bits": [3, "4"]'), "GRID field 'bits'"),
    (('"paper_for": "gdfq",', ''), "no 'paper_for'"),
    (('"year": 2020', '"year": YEAR_FROM_ELSEWHERE'), "GRID cannot be evaluated"),
    (('    return METHOD\n', '    return METHOD + imported_name\n'), "variant(args) failed"),
])
def test_a_malformed_grid_or_variant_is_one_line_naming_the_file_and_field(tmp_path, edit, words):
    shutil.copy(os.path.join(ROOT, "common.py"), tmp_path)
    src = open(os.path.join(ROOT, "gdfq.py")).read()
    assert edit[0] in src
    (tmp_path / "gdfq.py").write_text(src.replace(edit[0], edit[1], 1))
    runs = tmp_path / "runs" / "short" / "x"
    runs.mkdir(parents=True)
    (runs / "summary.json").write_text(json.dumps({"teacher_top1": 90.0, "calibrated_top1": 80.0, "final_top1": 81.0,
                                                   "best_top1": 82.0, "args": {"method": "gdfq", "dataset": "cifar10",
                                                                               "wbits": 4, "abits": 4, "seed": 0}}))
    shutil.copytree(os.path.join(ROOT, "tools"), tmp_path / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in ([sys.executable, "tools/grid.py"], [sys.executable, "tools/report.py", "--runs", "runs", "--out",
                                                    "R.md", "--plot", "p.png"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        if "variant" in words and cmd[1] == "tools/grid.py":
            assert r.returncode == 0, r.stderr  # grid.py does not call variant()
            continue
        assert r.returncode == 2 and words in r.stderr and "gdfq.py" in r.stderr, (cmd, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


FAKE_WANDB = """import json, os
CALLS = os.environ["FAKE_WANDB_CALLS"]
def _rec(*a):
    with open(CALLS, "a") as f:
        f.write(json.dumps(a, default=str) + "\\n")
class _Summary(dict):
    def update(self, d):
        _rec("summary", d)
class _Run:
    summary = _Summary()
    def log(self, d, step=None):
        _rec("log", d, step)
    def save(self, path, base_path=None, policy=None):
        _rec("save", os.path.relpath(path, base_path), open(path).read())
    def finish(self):
        _rec("finish")
def init(**kw):
    _rec("init", kw)
    return _Run()
"""


@pytest.mark.slow
def test_track_logs_the_same_scalars_config_and_code(tiny_data, teachers, tmp_path):
    """--track with a stand-in wandb module that records its calls: every metrics.jsonl row is logged with the same
    scalars, the args are the config, the run's code files are saved, the summary's figures are the run's."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "wandb.py").write_text(FAKE_WANDB)
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(site), "FAKE_WANDB_CALLS": str(calls)}
    r = subprocess.run([sys.executable, "gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"],
                        "--out-dir", str(tmp_path), "--run-name", "w", "--threads", "1", "--track",
                        "--wandb-project", "proj", *TINY["zero-shot"]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in calls.read_text().splitlines()]
    (init,) = [c[1] for c in got if c[0] == "init"]
    assert init["project"] == "proj" and init["name"] == "w" and init["config"]["wbits"] == 4
    saved = {c[1]: c[2] for c in got if c[0] == "save"}
    assert saved == {f"code/{n}": open(os.path.join(ROOT, n)).read() for n in ("gdfq.py", "common.py")}
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    logged = [c for c in got if c[0] == "log"]
    assert len(logged) == len(rows) == 3
    for (_, d, step), row in zip(logged, rows):
        assert d == {k: v for k, v in row.items() if k != "iteration"} and step == (row["iteration"] or row["epoch"])
    (summary,) = [c[1] for c in got if c[0] == "summary"]
    assert summary["final_top1"] == json.loads((tmp_path / "w" / "summary.json").read_text())["final_top1"]
    assert got[-1] == ["finish"]


@pytest.mark.slow
def test_track_runs_with_the_real_wandb_offline(tiny_data, teachers, tmp_path):
    """The real package, WANDB_MODE=offline: the run ends, W&B's offline run holds the code, the metric names and
    the config (its binary log is read as bytes: the package ships no reader for it)."""
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"],
                        "--out-dir", str(tmp_path), "--run-name", "w", "--threads", "1", "--track",
                        *TINY["zero-shot"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (offline,) = glob.glob(str(tmp_path / "w" / "wandb" / "offline-run-*"))
    for name in ("gdfq.py", "common.py"):
        assert open(os.path.join(offline, "files", "code", name)).read() == open(os.path.join(ROOT, name)).read()
    (log,) = glob.glob(os.path.join(offline, "*.wandb"))
    data = open(log, "rb").read()
    assert all(k in data for k in (b"eval/top1", b"losses/loss_S", b"final_top1", b"wbits", b"teacher_top1"))


def test_track_without_wandb_is_one_line(tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ImportError('no wandb here')\n")
    r = subprocess.run([sys.executable, "-c", "import importlib.util, sys; sys.modules['wandb'] = None; "
                        "sys.argv = ['gdfq.py', '--track', '--epochs', '0']; sys.path.insert(0, '.'); "
                        "import runpy; runpy.run_path('gdfq.py', run_name='__main__')"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--track needs the wandb package" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
