"""A script is a starting point for new research: a renamed copy runs, resumes and names itself; a new script joins
the grid and the report by declaring GRID; every saved student loads through its own script; saved files load
without running code; common.py, run_all.sh and tools/report.py know no method by name; the per-script copies of the
GDFQ generator and BNS loss stay identical."""
import ast
import json
import os
import shutil
import subprocess
import sys
import tokenize

import pytest
import torch
from conftest import ROOT, random_teacher, run_script

SCRIPTS = ["gdfq", "ait", "akt", "lrq", "faqd", "sqakd", "synq"]
TINY = {"zero-shot": ["--epochs", "3", "--warmup-epochs", "1", "--iters-per-epoch", "2", "--batch-size", "8",
                      "--milestones-from", "train"],
        "label-free": ["--epochs", "3", "--train-subset", "16", "--batch-size", "8"]}


def kind(script):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import grid
    return grid.methods()[script]["kind"]


def tiny(script):
    """The smallest run of a script: its kind's tiny budget plus what its GRID adds for the smoke budget."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import grid
    return [*TINY[kind(script)], *grid.methods()[script].get("budget_args", {}).get("smoke", "").split()]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_renamed_copy_runs_resumes_and_names_itself(script, tiny_data, teachers, tmp_path):
    """cp SCRIPT.py mykd.py next to common.py only: run, stop, resume, save and reload the student."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(ROOT, "common.py"), work)
    shutil.copy(os.path.join(ROOT, f"{script}.py"), work / "mykd.py")
    args = ["mykd.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path / "runs"),
            "--threads", "1", "--device", "cpu", "--save-model", *tiny(script)]
    r = run_script([*args, "--stop-after", "2"], cwd=work)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("cifar10__mykd__w4a4__seed0__")
    assert f"continue with: python mykd.py --resume {run_dir}" in r.stdout
    r = run_script(["mykd.py", "--resume", str(run_dir), "--threads", "1"], cwd=work)
    assert r.returncode == 0, r.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["args"]["method"] == "mykd" and s["epochs_done"] == 3 and "provenance" in s
    blob = torch.load(run_dir / "model.pt", weights_only=True)
    assert blob["script"] == "mykd"
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from common import "
                        "load_quantized; m, mean, std = load_quantized(sys.argv[2]); print(type(m).__name__)",
                        str(work), str(run_dir / "model.pt")], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "CifarResNet", r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_saved_student_loads_and_scores_the_final_top1(script, tiny_data, tmp_path):
    """model.pt of every method rebuilds through its script and scores exactly the summary's final top-1; its
    state equals the last checkpoint's student. A teacher trained for a few steps on the tiny data gives a top-1
    that differs from chance, so that a wrong rebuild shows."""
    from common import EvalData, load_quantized, load_teacher
    teacher = random_teacher(10)
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    r = run_script([f"{script}.py", "--data-dir", tiny_data, "--teacher", str(path), "--out-dir", str(tmp_path),
                    "--run-name", "r", "--threads", "1", "--save-model", *tiny(script)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    model, mean, std = load_quantized(str(tmp_path / "r" / "model.pt"))
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["student"]
    assert all(torch.equal(v, ckpt[k]) for k, v in model.state_dict().items())
    _, info = load_teacher(str(path), "cifar10")
    args = type("A", (), {"dataset": "cifar10", "data_dir": tiny_data, "eval_norm": "teacher", "device": "cpu"})
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert EvalData(args, info).top1(model) == s["final_top1"]


class Payload:
    """Stands for any pickled object: unpickling it would run code of the file's choosing."""


def test_saved_files_load_without_running_code(tmp_path):
    """A model.pt (or checkpoint) that needs unpickling of arbitrary objects is refused with a one-line error."""
    from common import UserError, load_quantized
    torch.save({"state_dict": {}, "payload": Payload()}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="cannot read .* which cleanqd does not unpickle"):
        load_quantized(str(tmp_path / "model.pt"))


@pytest.mark.slow
def test_faqd_float_acts_runs_resume(tiny_data, teachers, tmp_path):
    args = ["faqd.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
            "--run-name", "fa", "--float-acts", "--threads", "1", *TINY["label-free"]]
    assert run_script([*args, "--stop-after", "1"], cwd=ROOT).returncode == 0
    r = run_script(["faqd.py", "--resume", str(tmp_path / "fa")], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "fa" / "summary.json").read_text())["args"]["abits"] == 32


@pytest.mark.slow
def test_eta_after_resume_counts_only_this_session(tiny_data, teachers, tmp_path):
    """A resumed run's ETA divides the time since the resume by the epochs since the resume (not all elapsed time)."""
    args = ["gdfq.py", "--data-dir", tiny_data, "--teacher", teachers["cifar10"], "--out-dir", str(tmp_path),
            "--run-name", "e", "--threads", "1", *TINY["zero-shot"]]
    assert run_script([*args, "--stop-after", "1"], cwd=ROOT).returncode == 0
    ckpt = torch.load(tmp_path / "e" / "checkpoint.pt", weights_only=True)
    ckpt["elapsed"] = 100 * 3600.0  # as if the first session had taken 100 hours
    torch.save(ckpt, tmp_path / "e" / "checkpoint.pt")
    r = run_script(["gdfq.py", "--resume", str(tmp_path / "e"), "--threads", "1"], cwd=ROOT)
    line = next(x for x in r.stdout.splitlines() if x.startswith("epoch 2/3"))
    assert line.endswith("ETA 0:00:00") or line.split("ETA ")[1].startswith("0:0"), line


@pytest.mark.slow
def test_a_new_script_joins_the_grid_and_the_report(tiny_data, tmp_path):
    """Drop a renamed copy of akt.py into a checkout: run_all.sh runs it at the smoke budget with its declared bits,
    and tools/report.py puts it in RESULTS.md, the README's headline table and a docs page of its own."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ["common.py", "run_all.sh", *[f"{s}.py" for s in SCRIPTS]]:
        shutil.copy(os.path.join(ROOT, name), work)
    shutil.copytree(os.path.join(ROOT, "tools"), work / "tools")
    src = open(os.path.join(ROOT, "akt.py")).read()
    src = src.replace('"bits": [3, 4, 5]', '"bits": [4]').replace('"year": 2025', '"year": 2026')
    (work / "mykd.py").write_text(src)
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    torch.save(random_teacher(10).state_dict(), teachers / "cifar10_resnet20_test.pth")
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(["bash", "run_all.sh", "--dry-run", "--budget", "smoke", "--seeds", "0"], cwd=work, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "python mykd.py --dataset cifar10 --wbits 4" in r.stdout, r.stderr
    assert "--wbits 3" not in "".join(x for x in r.stdout.splitlines() if "mykd.py" in x)
    r = subprocess.run(["bash", "run_all.sh", "--budget", "smoke", "--methods", "mykd gdfq", "--seeds", "0",
                        "--datasets", "cifar10", "--bits", "4", "--data-dir", tiny_data,
                        "--teacher-dir", str(teachers)], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    results = (work / "results" / "RESULTS.md").read_text()
    assert "| mykd | cifar10 | W4A4 | smoke | 1 |" in results and "| gdfq | cifar10 | W4A4 | smoke | 1 |" in results
    (work / "README.md").write_text("<!-- headline tables: tools/report.py --readme -->\n"
                                    "<!-- end headline tables -->\n")
    (work / "docs").mkdir()
    (work / "docs" / "mykd.md").write_text("<!-- results table: tools/report.py --docs -->\n"
                                           "<!-- end results table -->\n")
    r = subprocess.run([sys.executable, "tools/report.py", "--runs", "results/runs", "--out", str(tmp_path / "R.md"),
                        "--readme", "README.md", "--docs", "docs", "--plot", str(tmp_path / "p.png"),
                        "--budget", "smoke"], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    readme = (work / "README.md").read_text()
    assert "| mykd |" in readme and readme.index("| gdfq |") < readme.index("| mykd |")  # table order: year
    doc = (work / "docs" / "mykd.md").read_text()
    assert "| mykd | cifar10 | W4A4 |" in doc and "| gdfq |" not in doc


def code_names(path):
    """The identifiers and code (not comments, not strings) of a Python file."""
    out = []
    with open(path) as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type == tokenize.NAME:
                out.append(tok.string)
    return set(out)


def test_shared_code_knows_no_method_by_name():
    for path in ("common.py", "tools/report.py", "tools/grid.py"):
        found = code_names(os.path.join(ROOT, path)) & set(SCRIPTS)
        assert not found, f"{path} names {found} in its code"
    strings = []
    with open(os.path.join(ROOT, "common.py")) as f:
        strings = [t.string for t in tokenize.generate_tokens(f.readline) if t.type == tokenize.STRING]
    assert not [s for s in strings if any(f'"{m}"' in s or f"'{m}'" in s or s.strip("\"'") == m for m in SCRIPTS)]
    with open(os.path.join(ROOT, "run_all.sh")) as f:
        code = [line.split("#")[0] for line in f if not line.lstrip().startswith("#")]
    assert not [x for x in code if any(f" {m} " in f" {x} " or f"{m}.py" in x or f"{m})" in x for m in SCRIPTS)]


def _defs(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {n.name: ast.dump(n) for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}


@pytest.mark.parametrize("script,names", [("ait.py", ["Generator", "build_student", "kd_loss"]),
                                          ("akt.py", ["Generator", "build_student"]),
                                          ("lrq.py", ["build_student"]),
                                          ("synq.py", ["Generator", "build_student"])])
def test_per_script_copies_stay_identical_to_gdfq(script, names):
    """Each script stands alone, so the GDFQ generator and student builder are copied: the copies must stay GDFQ's
    (comments aside; LRQ's generator and AKT's and LRQ's KD differ on purpose)."""
    ours, ref = _defs(script), _defs("gdfq.py")
    assert [n for n in names if ours[n] != ref[n]] == []


def test_bns_loss_copies_agree():
    """The BNS loss: ait/akt/lrq hold one text, and it computes GDFQ's values and gradients. (gdfq.py's own text
    orders two operations differently: unifying the text moves float rounding and so every committed trajectory.)"""
    copies = {s: _defs(s)["BNStatsLoss"] for s in ("ait.py", "akt.py", "lrq.py")}
    assert len(set(copies.values())) == 1
    import ait
    import gdfq
    teacher = random_teacher(10)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = []
    for module in (gdfq, ait):
        loss = module.BNStatsLoss(teacher)
        loss.active = True
        teacher(x)
        loss.active = False
        value = loss()
        (grad,) = torch.autograd.grad(value, x)
        out.append((value, grad))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-6) and torch.allclose(out[0][1], out[1][1], rtol=1e-5,
                                                                                atol=1e-9)
