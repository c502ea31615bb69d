"""run_all.sh (smoke budget on the tiny dataset: every method, skip-finished, failed runs) and the report's maths."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, random_teacher

sys.path.insert(0, os.path.join(ROOT, "tools"))
import report  # noqa: E402


def run_all(*args, cwd=ROOT):
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", "run_all.sh", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def teacher_dir(tmp_path, c100_classes=100):
    d = tmp_path / "teachers"
    d.mkdir()
    torch.save(random_teacher(10).state_dict(), d / "cifar10_resnet20_test.pth")
    torch.save(random_teacher(c100_classes).state_dict(), d / "cifar100_resnet20_test.pth")
    return str(d)


@pytest.mark.slow
def test_smoke_budget_runs_every_method_and_reports(tiny_data, tmp_path):
    out, res = tmp_path / "runs", tmp_path / "results"
    r = run_all("--budget", "smoke", "--bits", "4", "--seeds", "0 1", "--datasets", "cifar10", "--data-dir", tiny_data,
                "--teacher-dir", teacher_dir(tmp_path), "--out-dir", str(out), "--results-dir", str(res), "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    methods = ["gdfq", "ait", "akt", "lrq", "faqd", "sqakd", "synq"]
    for m in methods:
        for s in (0, 1):
            assert (out / "smoke" / f"cifar10__{m}__w4a4__seed{s}" / "summary.json").exists(), m
    table = (res / "RESULTS.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "cifar10" in line]
    assert sorted(line.split(" | ")[0][2:] for line in rows) == sorted(methods)
    for line in rows:  # each row: 2 seeds, and its final mean equals the mean of the two summaries
        cells = [c.strip() for c in line.strip("|").split("|")]
        m = cells[0]
        finals = [json.loads((out / "smoke" / f"cifar10__{m}__w4a4__seed{s}" / "summary.json").read_text())[
            "final_top1"]
                  for s in (0, 1)]
        assert cells[4] == "2" and cells[7].startswith(f"{sum(finals) / 2:.2f}")
    # a second call skips every finished run and starts none
    r2 = run_all("--budget", "smoke", "--bits", "4", "--seeds", "0 1", "--datasets", "cifar10", "--data-dir", tiny_data,
                 "--teacher-dir", str(tmp_path / "teachers"), "--out-dir", str(out), "--results-dir", str(res))
    assert r2.returncode == 0 and "0 runs to do, 14 already finished (skipped)" in r2.stdout


@pytest.mark.slow
def test_failed_run_reported_others_continue_and_interrupted_run_resumes(tiny_data, tmp_path):
    out, res = tmp_path / "runs", tmp_path / "results"
    tdir = teacher_dir(tmp_path, c100_classes=10)  # the CIFAR-100 "teacher" has 10 classes: those runs must fail
    args = ["--budget", "smoke", "--methods", "gdfq", "--bits", "4", "--seeds", "0", "--data-dir", tiny_data,
            "--teacher-dir", tdir, "--out-dir", str(out), "--results-dir", str(res)]
    r = run_all(*args)
    assert r.returncode == 1
    assert "FAILED cifar100__gdfq__w4a4__seed0" in r.stdout and "do not match" in r.stdout
    assert (out / "smoke" / "cifar10__gdfq__w4a4__seed0" / "summary.json").exists()
    assert "cifar10" in (res / "RESULTS.md").read_text()
    # an interrupted run (checkpoint, no summary) is resumed, not restarted
    d = out / "smoke" / "cifar10__gdfq__w4a4__seed0"
    (d / "summary.json").unlink()
    first_rows = (d / "metrics.jsonl").read_text().splitlines()[:1]
    (d / "metrics.jsonl").write_text(first_rows[0] + "\n")
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    assert ck["epochs_done"] == 2
    r = run_all(*args, "--datasets", "cifar10")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed" in (out / "smoke" / "cifar10__gdfq__w4a4__seed0.log").read_text()


@pytest.mark.slow
def test_bad_options_exit_2(tmp_path):
    assert run_all("--budget", "huge").returncode == 2
    assert run_all("--jobs", "0").returncode == 2
    r = run_all("--methods", "nosuch", "--dry-run", "--out-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown method nosuch" in r.stderr


def write_summary(root, budget, name, method, final, best, seed, bits=4, **args):
    d = root / budget / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "teacher_top1": 92.6, "calibrated_top1": 80.0, "final_top1": final, "best_top1": best,
        "args": {"method": method, "dataset": "cifar10", "wbits": bits, "abits": bits, "seed": seed, **args}}))


def test_report_mean_std_by_hand(tmp_path):
    for seed, (final, best) in enumerate([(80.0, 81.0), (82.0, 83.0), (84.0, 88.0)]):
        write_summary(tmp_path, "short", f"g{seed}", "gdfq", final, best, seed)
    write_summary(tmp_path, "short", "a0", "ait", 70.5, 71.0, 0)
    groups = report.collect(str(tmp_path))
    assert report.mean_std([80.0, 82.0, 84.0]) == (82.0, 2.0)  # sample std: sqrt(((-2)^2 + 0 + 2^2) / 2) = 2
    text = report.table(groups)
    gdfq_row = [line for line in text.splitlines() if line.startswith("| gdfq")][0]
    # best: mean 84, sample std sqrt(((81-84)^2 + (83-84)^2 + (88-84)^2) / 2) = sqrt(13) = 3.61
    assert "| 3 |" in gdfq_row and "82.00 ± 2.00" in gdfq_row and "84.00 ± 3.61" in gdfq_row
    assert "90.25 (GDFQ paper)" in gdfq_row and "| 92.60 |" in gdfq_row  # one teacher: its value, no "± 0.00"
    ait_row = [line for line in text.splitlines() if line.startswith("| ait")][0]
    assert "| 1 |" in ait_row and "70.50" in ait_row and "91.23 (AIT paper" in ait_row
    out = tmp_path / "R.md"
    report.main(["--runs", str(tmp_path), "--out", str(out), "--plot", str(tmp_path / "p.png")])
    assert "82.00 ± 2.00" in out.read_text()
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "p.png").exists() == has_mpl


def test_plot_series_draws_the_headline_budget_only_and_leaves_ablations_out(tmp_path):
    write_summary(tmp_path, "short", "g4s0", "gdfq", 80.0, 81.0, 0)
    write_summary(tmp_path, "short", "g4s1", "gdfq", 84.0, 85.0, 1)
    write_summary(tmp_path, "short", "g3s0", "gdfq", 40.0, 41.0, 0, bits=3)
    write_summary(tmp_path, "paper", "g4p", "gdfq", 90.0, 90.5, 0)
    write_summary(tmp_path, "short", "lrq_abl", "lrq", 70.0, 71.0, 0, no_lka=True, ama_margin=0.0, kd="kl")
    write_summary(tmp_path, "short-v0", "old", "gdfq", 10.0, 11.0, 0)  # made with older code: table only
    write_summary(tmp_path, "short", "frozen", "faqd", 50.0, 51.0, 0, alpha_mode="frozen")  # a variant: table only
    groups = report.collect(str(tmp_path))
    s = report.series(groups)
    assert "| gdfq | cifar10 | W4A4 | short-v0 | 1 |" in report.table(groups)
    # 2 seeds at W4: mean 82, sample std sqrt((2^2 + 2^2) / 1) = 2.83; bits sorted; other budgets are not drawn
    assert list(s) == [("cifar10", "short")]
    assert list(s[("cifar10", "short")]) == ["gdfq"]  # lrq:none is an ablation: table only
    (b3, m3, s3), (b4, m4, s4) = s[("cifar10", "short")]["gdfq"]
    assert (b3, m3, s3) == (3, 40.0, 0.0) and (b4, m4) == (4, 82.0) and abs(s4 - 8 ** 0.5) < 1e-12
    assert report.series(groups, "paper") == {("cifar10", "paper"): {"gdfq": [(4, 90.0, 0.0)]}}


def test_figures_block_by_hand(tmp_path):
    """A method page's figures: calibrated -> final means, the per-seed change, the standing among the methods of
    its kind in the cell (with the difference of means), wall time and images/s."""
    for seed, final in enumerate([82.0, 84.0]):  # calibrated 80.0 in write_summary: changes +2, +4
        write_summary(tmp_path, "short", f"g{seed}", "gdfq", final, final, seed)
    write_summary(tmp_path, "short", "a0", "ait", 85.5, 86.0, 0)
    write_summary(tmp_path, "short", "s0", "sqakd", 99.0, 99.0, 0)  # another kind: not a rival
    for d in tmp_path.glob("short/*"):
        s = json.loads((d / "summary.json").read_text())
        s["wall_seconds"], s["cost"] = 600.0 + 60 * s["args"]["seed"], {"images_per_s": 50.0 + s["args"]["seed"]}
        (d / "summary.json").write_text(json.dumps(s))
    groups = report.collect(str(tmp_path))
    row = report.figures(groups, "gdfq").splitlines()[2]
    assert row == ("| gdfq | cifar10 | W4A4 | short | 2 | 80.00 → 83.00 | +2.00 to +4.00 | 2 of 2, -2.50 to ait | "
                   "10–11 min | 50–51 |")
    assert "| 1 of 2, +2.50 over gdfq |" in report.figures(groups, "ait")
    cost = report.cost_table(groups).splitlines()
    assert "| gdfq | short | 2 | 10–11 min | 50–51 |" in "\n".join(cost)
    if importlib.util.find_spec("matplotlib") is not None:  # learning curves: one picture per method
        for d in tmp_path.glob("short/*"):
            (d / "metrics.jsonl").write_text('{"epoch": 0, "eval/top1": 70.0}\n{"epoch": 1, "eval/top1": 75.0}\n')
        assert sorted(os.path.basename(p) for p in report.curves(report.collect(str(tmp_path)), tmp_path / "c")) \
            == ["ait.png", "gdfq.png", "sqakd.png"]


def test_plot_colours_a_method_the_same_in_every_panel():
    # cifar10 has ait, gdfq, sqakd; cifar100 only gdfq and sqakd: per-panel colour cycling would recolour them
    panels = {("cifar10", "short"): {"ait": [], "gdfq": [], "sqakd": []},
              ("cifar100", "short"): {"gdfq": [], "sqakd": []}}
    assert report.method_colors(panels) == {"ait": "C0", "gdfq": "C1", "sqakd": "C2"}


def test_report_labels_lrq_ablation_variants_apart():
    def lrq(**kw):
        return report.label({"method": "lrq", "no_lka": False, "ama_margin": 0.1, "kd": "dkd", **kw})

    assert lrq() == "lrq"
    assert lrq(no_lka=True, kd="kl") == "lrq:ama0.1" and lrq(no_lka=True, ama_margin=0.3, kd="kl") == "lrq:ama0.3"
    assert lrq(ama_margin=0.0, kd="kl") == "lrq:lka" and lrq(no_lka=True, ama_margin=0.0) == "lrq:dkd"
    assert lrq(no_lka=True, ama_margin=0.0, kd="kl") == "lrq:none"


def test_report_refreshes_the_readme_table_between_its_markers(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_summary(runs, "short", "g0", "gdfq", 80.0, 81.0, 0)
    write_summary(runs, "short", "abl", "lrq", 70.0, 71.0, 0, no_lka=True, ama_margin=0.0, kd="kl")
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{report.BEGIN}\n| old | table |\n{report.END}\n\ntail text\n")
    report.main(["--runs", str(runs), "--out", str(tmp_path / "R.md"), "--plot", str(tmp_path / "p.png"),
                 "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith(f"# intro\n\n{report.BEGIN}\n| zero-shot") and text.endswith(f"{report.END}\n\ntail text\n")
    assert "| old | table |" not in text and "| gdfq | 80.00 (1) |" in text and "CIFAR-10 W4A4" in text
    assert "lrq:none" not in text and "| lrq | n/a |" in text and "lrq:none" in (tmp_path / "R.md").read_text()
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit) as e:
        report.main(["--runs", str(runs), "--out", str(tmp_path / "R.md"), "--plot", str(tmp_path / "p.png"),
                     "--readme", str(readme)])
    assert e.value.code == 2 and "needs one" in capsys.readouterr().err and readme.read_text() == "no markers\n"


def test_readme_pivot_means_current_code_only(tmp_path):
    write_summary(tmp_path, "short", "a", "gdfq", 80.0, 81.0, 0)
    write_summary(tmp_path, "short", "b", "gdfq", 84.0, 85.0, 1)
    write_summary(tmp_path, "short", "c", "sqakd", 70.0, 71.0, 0, bits=2)
    write_summary(tmp_path, "short-v0", "d", "ait", 10.0, 11.0, 0)  # superseded: not on the front page
    write_summary(tmp_path, "short", "e", "faqd", 50.0, 51.0, 0, alpha_mode="frozen")  # a variant: its page only
    text = report.pivot(report.collect(str(tmp_path)))
    zs, lf = text.split("\n\n")
    # the superseded run's column, and a protocol column ("—": these summaries record none)
    assert zs.splitlines()[0] == "| zero-shot (generated images) | CIFAR-10 W4A4 | protocol |"
    assert "| gdfq | 82.00 ± 2.83 (2) | — |" in zs and "| ait | — | — |" in zs  # ... without its value
    assert "| sqakd | 70.00 (1) | — |" in lf and "| faqd | n/a | — |" in lf  # faqd ran only as a variant here
    # the state of the art beside them: the highest published figure among the kind's methods, per column
    import grid
    best = max((g["paper"]["cifar10 W4A4"][0], m) for m, g in grid.methods().items()
               if g["kind"] == "zero-shot" and "cifar10 W4A4" in g.get("paper", {}))
    row = f"| best published (the papers' own figures) | {best[0]:.2f} ({best[1]}, paper budget) | paper budget |"
    assert zs.splitlines()[-1] == row
    assert best[1] == "synq" and "best published" not in lf  # no label-free paper figures are declared


def test_protocol_tag_names_each_distinct_protocol_once():
    def run(q, it, b):
        return {"protocol": {"quantizer": q, "iterations": it, "batch": b}}
    runs = [run("zeroq: per channel", 800, 64), run("zeroq: other words", 800, 64), run("sqakd-ewgs: x", 78, 256), {}]
    assert report.protocol_tag(runs) == "zeroq, 800 × 64; sqakd-ewgs, 78 × 256"
    assert report.protocol_tag([{}]) == "—"


def test_report_labels_the_parity_flags_apart():
    assert report.label({"method": "faqd", "alpha_mode": "frozen"}) == "faqd-frozen"
    assert report.label({"method": "faqd", "alpha_mode": "learned"}) == "faqd"
    assert report.label({"method": "faqd", "float_acts": True, "alpha_mode": "learned"}) == "faqd-floatacts"
    assert report.label({"method": "ait", "gi_result": "upper"}) == "ait-upper"
    assert report.label({"method": "ait", "gi_result": "midpoint"}) == "ait"
    lrq = {"method": "lrq", "no_lka": True, "ama_margin": 0.0, "kd": "dkd"}
    assert report.label({**lrq, "dkd_beta": 2.0, "dkd_ce_weight": 1.0}) == "lrq:dkd-b2-ce"
    assert report.label({**lrq, "dkd_beta": 8.0, "dkd_ce_weight": 0.0}) == "lrq:dkd"
    assert report.label({**lrq, "no_lka": False, "ama_margin": 0.3, "dkd_ce_weight": 1.0}) == "lrq-ce"


def test_report_refreshes_each_docs_page_with_its_method_rows(tmp_path):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    write_summary(runs, "short", "f0", "faqd", 80.0, 81.0, 0, alpha_mode="learned")
    write_summary(runs, "short", "f1", "faqd", 70.0, 71.0, 0, alpha_mode="frozen")
    write_summary(runs, "short", "g0", "gdfq", 60.0, 61.0, 0)
    docs.mkdir()
    (docs / "faqd.md").write_text(f"# FAQD\n{report.DOC_BEGIN}\nold\n{report.DOC_END}\nend\n")
    (docs / "gdfq.md").write_text("# GDFQ, no table\n")
    (docs / "reproduce.md").write_text(f"{report.DOC_BEGIN}\n{report.DOC_END}\n")
    report.main(["--runs", str(runs), "--out", str(tmp_path / "R.md"), "--plot", str(tmp_path / "p.png"),
                 "--docs", str(docs)])
    text = (docs / "faqd.md").read_text()
    assert "| faqd | cifar10 |" in text and "| faqd-frozen | cifar10 |" in text and "gdfq" not in text
    assert "old" not in text and text.endswith(f"{report.DOC_END}\nend\n")
    assert (docs / "gdfq.md").read_text() == "# GDFQ, no table\n"
    every = (docs / "reproduce.md").read_text()
    assert "| faqd | cifar10 |" in every and "| faqd-frozen |" in every and "| gdfq | cifar10 |" in every


GRID_ARGS = ["--budget", "smoke", "--seeds", "0 1", "--datasets", "cifar10", "--methods", "gdfq sqakd", "--bits", "4"]


def test_list_prints_the_whole_grid_in_task_order(tmp_path):
    r = run_all(*GRID_ARGS, "--list", "--out-dir", str(tmp_path))
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 4, r.stderr
    names = [x.split("--run-name ")[1].split()[0] for x in lines]
    assert names == ["cifar10__gdfq__w4a4__seed0", "cifar10__gdfq__w4a4__seed1", "cifar10__sqakd__w4a4__seed0",
                     "cifar10__sqakd__w4a4__seed1"]
    assert all(x.startswith(("python gdfq.py ", "python sqakd.py ")) for x in lines)
    assert not os.path.exists(tmp_path / "smoke")  # listing makes nothing
    assert run_all(*GRID_ARGS, "--task", "4", "--out-dir", str(tmp_path)).returncode == 2


@pytest.mark.slow
def test_slurm_array_runs_the_grid_once_resumes_and_reports_as_a_local_run(tiny_data, tmp_path):
    """A fake sbatch records the submission; the generated script, executed once per array index, runs exactly the
    grid (each run once), a stopped task resumes, a finished one is skipped, and the report equals a local run's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/usr/bin/env bash\necho "$@" > "$FAKE_SBATCH_LOG"\n'
                                    'echo "Submitted batch job 7"\n')
    (bin_dir / "sbatch").chmod(0o755)
    tdir = teacher_dir(tmp_path)
    out, local = tmp_path / "array", tmp_path / "local"
    common = [*GRID_ARGS, "--data-dir", tiny_data, "--teacher-dir", tdir]
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "FAKE_SBATCH_LOG": str(tmp_path / "sb"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "run_all.sh", *common, "--out-dir", str(out), "--slurm", "--time=2:00:00 --mem=8G"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "Submitted batch job 7" in r.stdout, r.stderr
    script = out / "smoke" / "slurm_array.sh"
    assert (tmp_path / "sb").read_text().split() == [str(script)]
    text = script.read_text()
    assert "#SBATCH --array=0-3%1" in text and "#SBATCH --time=2:00:00" in text and "#SBATCH --mem=8G" in text
    assert "#SBATCH --requeue" in text and "--task \"$SLURM_ARRAY_TASK_ID\"" in text
    # task 1 was stopped after its first epoch (a preempted task): the array resumes it
    first = run_all(*common, "--list", "--out-dir", str(out)).stdout.splitlines()[1].split()
    assert subprocess.run([sys.executable, *first[1:], "--stop-after", "1"], cwd=ROOT, env=env,
                          capture_output=True).returncode == 0
    for i in range(4):
        r = subprocess.run(["bash", str(script)], cwd=ROOT, env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
    runs = sorted(p.name for p in (out / "smoke").iterdir() if (p / "summary.json").exists())
    assert runs == sorted(x.split("--run-name ")[1].split()[0] for x in run_all(*common, "--list").stdout.splitlines())
    logs = {n: (out / "smoke" / f"{n}.log").read_text() for n in runs}
    assert all(log.count("done: final top-1") == 1 for log in logs.values())  # each run finished exactly once
    assert "resumed" in logs["cifar10__gdfq__w4a4__seed1"]
    r = subprocess.run(["bash", str(script)], cwd=ROOT, env={**env, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True,
                       text=True)
    assert "already finished" in r.stdout
    r = run_all(*common, "--out-dir", str(out), "--report-only", "--results-dir", str(tmp_path / "ra"))
    assert r.returncode == 0
    assert run_all(*common, "--out-dir", str(local), "--results-dir", str(tmp_path / "rl")).returncode == 0

    def rows(d):
        return [x for x in (d / "RESULTS.md").read_text().splitlines() if x.startswith(("| gdfq", "| sqakd"))]
    assert rows(tmp_path / "ra") == rows(tmp_path / "rl") and len(rows(tmp_path / "ra")) == 2


@pytest.mark.slow
def test_a_task_forwards_sigterm_keeps_its_checkpoint_and_resumes(tiny_data, tmp_path):
    import signal
    import time
    common = [*GRID_ARGS, "--data-dir", tiny_data, "--teacher-dir", teacher_dir(tmp_path), "--out-dir", str(tmp_path),
              "--extra", "--iters-per-epoch 120"]
    env = {**os.environ, "CLEANQD_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen(["bash", "run_all.sh", *common, "--task", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = tmp_path / "smoke" / "cifar10__gdfq__w4a4__seed0.log"
    t0 = time.time()
    while not (log.exists() and "epoch 1/2" in log.read_text()):
        assert time.time() - t0 < 300 and p.poll() is None, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143 and "exit 143" in out, out
    assert "interrupted (SIGTERM) in epoch 2/2" in log.read_text()
    r = run_all(*common, "--task", "0")
    assert r.returncode == 0 and "resumed" in log.read_text() and (log.parent / log.stem / "summary.json").exists()


def test_report_refuses_to_average_runs_of_different_protocols(tmp_path):
    """Two seeds of one cell whose summaries record different protocols (here the training iterations): exit 2 and
    a line naming the cell and the field; the same protocol passes."""
    def summary(seed, iterations):
        d = tmp_path / "runs" / "short" / f"cifar10__gdfq__w4a4__seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({
            "final_top1": 80.0 + seed, "best_top1": 81.0, "calibrated_top1": 79.0, "teacher_top1": 92.6,
            "args": {"method": "gdfq", "dataset": "cifar10", "wbits": 4, "abits": 4},
            "protocol": {"iterations": iterations, "batch": 64, "teacher_sha256": "ab"}}))
    summary(0, 800)
    summary(1, 800)
    args = ["tools/report.py", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "R.md"), "--plot",
            str(tmp_path / "p.png")]
    assert subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True).returncode == 0
    summary(2, 1600)
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "cell gdfq cifar10 4 4 short mixes protocols (iterations differ)" in r.stderr


def test_a_method_grid_adds_its_own_budget_flags():
    """GRID["budget_args"] adds flags for one budget (synq: the size of its synthesis stage), after the shared ones."""
    for budget, flags in (("short", "--num-images 512 --syn-batch 256 --syn-iters 200"),
                          ("smoke", "--num-images 16 --syn-batch 8 --syn-iters 2")):
        r = run_all("--list", "--budget", budget, "--methods", "synq gdfq", "--datasets", "cifar10", "--bits", "4",
                    "--seeds", "0")
        synq_line, gdfq_line = r.stdout.strip().splitlines()
        assert r.returncode == 0 and flags in synq_line and "--num-images" not in gdfq_line, r.stdout
    r = run_all("--list", "--budget", "paper", "--methods", "synq", "--datasets", "cifar10", "--bits", "4",
                "--seeds", "0")
    assert "--num-images" not in r.stdout  # the paper budget: the script's own defaults


def test_drift_check_flags_a_run_outside_the_committed_band(tmp_path, capsys):
    """report.py --check: 3 committed runs -> mean ± 3 std (82 ± 6); 1 committed run -> mean ± --margin; no committed
    cell or another protocol -> listed, not drift; exit 1 only when a run drifted."""
    old, new = tmp_path / "old", tmp_path / "new"
    for seed, final in enumerate([80.0, 82.0, 84.0]):
        write_summary(old, "smoke", f"g{seed}", "gdfq", final, final, seed)
    write_summary(old, "smoke", "a0", "ait", 70.0, 70.0, 0)
    write_summary(new, "smoke", "g0", "gdfq", 87.9, 87.9, 0)  # inside 82 ± 6
    write_summary(new, "smoke", "a0", "ait", 71.5, 71.5, 0)  # inside 70 ± 2
    write_summary(new, "smoke", "l0", "faqd", 10.0, 10.0, 0)  # nothing committed
    with pytest.raises(SystemExit) as e:
        report.main(["--runs", str(old), "--check", str(new)])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "ok     gdfq cifar10 4 4 smoke seed 0: 87.90 vs committed 82.00 ± 6.00 (3 std, 3 runs)" in out
    assert "ok     ait cifar10 4 4 smoke seed 0: 71.50 vs committed 70.00 ± 2.00 (margin 2, n < 3, 1 runs)" in out
    assert "new    faqd cifar10 4 4 smoke: nothing committed" in out and "0 of 2 runs drifted" in out
    write_summary(new, "smoke", "g1", "gdfq", 88.1, 88.1, 1)  # outside
    with pytest.raises(SystemExit) as e:
        report.main(["--runs", str(old), "--check", str(new), "--margin", "1"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "DRIFT  gdfq cifar10 4 4 smoke seed 1: 88.10" in out
    assert "DRIFT  ait cifar10 4 4 smoke seed 0: 71.50 vs committed 70.00 ± 1.00" in out and "2 of 3 runs" in out
    # another protocol: not compared
    p = old / "smoke" / "a0" / "summary.json"
    s = json.loads(p.read_text())
    s["protocol"] = {"train_data": "generated"}
    p.write_text(json.dumps(s))
    q = new / "smoke" / "a0" / "summary.json"
    s2 = json.loads(q.read_text())
    s2["protocol"] = {"train_data": "real"}
    q.write_text(json.dumps(s2))
    with pytest.raises(SystemExit):
        report.main(["--runs", str(old), "--check", str(new)])
    out = capsys.readouterr().out
    assert "skip   ait cifar10 4 4 smoke: committed under another protocol (train_data differ)" in out
    # --floor widens a band narrower than it (3 std = 6 here), never narrows one
    with pytest.raises(SystemExit) as e:
        report.main(["--runs", str(old), "--check", str(new), "--floor", "6.5"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "88.10 vs committed 82.00 ± 6.50 (floor 6.5 > 3 std, 3 runs)" in out
    with pytest.raises(SystemExit) as e:
        report.main(["--runs", str(old), "--check", str(new), "--floor", "1"])
    assert e.value.code == 1 and "88.10 vs committed 82.00 ± 6.00 (3 std, 3 runs)" in capsys.readouterr().out
