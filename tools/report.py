"""Collect every summary.json under --runs into a results table (results/RESULTS.md) and, when matplotlib is
installed, a plot of top-1 against bit-width.

    python tools/report.py --runs results/runs --out results/RESULTS.md --plot results/accuracy_vs_bits.png

Rows: method (with its variant), dataset, W/A bits, budget; our final and best top-1 as mean ± sample std over
seeds and the number of seeds; the teacher top-1 we measured; the paper's number beside ours where one exists.
"""
import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grid  # noqa: E402 - the methods, their kinds, variants and published numbers, read from the scripts

KIND_TITLES = {"zero-shot": "zero-shot (generated images)", "label-free": "label-free (real images, labels unused)"}


def label(args):
    """A run's row: its script's variant(args) (the method name, or a variant when flags change the algorithm)."""
    return grid.label(args)


def paper_number(method, row_label, ds, w):
    """(published top-1, source) for a row, from its script's GRID, or None."""
    g = grid.methods().get(method, {})
    table = g.get("paper", {}) if row_label == method else \
        g.get("variant_paper", {}).get(row_label[len(method):].lstrip("+-:"), {})
    return table.get(f"{ds} W{w}A{w}")


def collect(runs_dir):
    """{(label, dataset, wbits, abits, budget): [summary, ...]} from every summary.json below runs_dir; the budget
    is the folder directly below runs_dir (run_all.sh writes runs_dir/BUDGET/NAME/summary.json)."""
    groups = defaultdict(list)
    for root, _, files in os.walk(runs_dir):
        if "summary.json" not in files:
            continue
        with open(os.path.join(root, "summary.json")) as f:
            s = json.load(f)
        if s.get("final_top1") is None:  # teacher-only runs
            continue
        a = s["args"]
        rel = os.path.relpath(root, runs_dir).split(os.sep)
        budget = rel[0] if len(rel) > 1 else "?"
        row = label(a)
        METHOD_OF[row] = a["method"]
        s["_dir"] = root  # where its metrics.jsonl lies (learning curves)
        dataset = f"imagenet {a.get('arch')}" if a["dataset"] == "imagenet" else a["dataset"]  # a cell per network
        groups[(row, dataset, a["wbits"], a["abits"], budget)].append(s)
    return groups


METHOD_OF = {}  # row label -> the script (method) it comes from


def mixed_protocols(groups):
    """Cells whose runs were made under different protocols (summaries record one since runs did): one line each,
    naming the fields that differ. Runs made before summaries recorded a protocol are not compared."""
    errors = []
    for key, runs in sorted(groups.items()):
        protos = [r["protocol"] for r in runs if r.get("protocol")]
        fields = sorted({k for p in protos for k in p if len({repr(q.get(k)) for q in protos}) > 1})
        if fields:
            errors.append(f"cell {' '.join(map(str, key))} mixes protocols ({', '.join(fields)} differ): "
                          "give one of them another budget folder or --run-name")
    return errors


def mean_std(xs):
    """(mean, sample std) of a list; std is 0.0 for a single value."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs):
    m, s = mean_std(xs)
    return f"{m:.2f} ± {s:.2f}" if len(xs) > 1 else f"{m:.2f}"


def table(groups, ablations=True, methods=None):
    """Markdown rows (variants included unless ablations=False; only labels of `methods` when given)."""
    lines = ["| method | dataset | W/A | budget | seeds | teacher top-1 (ours) | calibrated | final top-1 | best top-1 "
             "| paper | code |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (k[1], k[0], k[2], k[3], k[4])):
        method, ds, w, a, budget = key
        if (":" in method and not ablations) or (methods and base(method) not in methods):
            continue
        runs = groups[key]
        calib = [r["calibrated_top1"] for r in runs if r.get("calibrated_top1") is not None]
        paper = paper_number(base(method), method, ds, w) if w == a else None
        note = grid.methods().get(base(method), {}).get("note", "—")
        paper_txt = f"{paper[0]:.2f} ({paper[1]})" if paper else note
        teacher = sorted({r["teacher_top1"] for r in runs})  # one teacher per row: its value, not a mean ± 0
        teacher_txt = f"{teacher[0]:.2f}" if len(teacher) == 1 else fmt([r["teacher_top1"] for r in runs])
        lines.append(f"| {method} | {ds} | W{w}A{a} | {budget} | {len(runs)} | {teacher_txt} | "
                     f"{fmt(calib) if calib else '—'} | {fmt([r['final_top1'] for r in runs])} | "
                     f"{fmt([r['best_top1'] for r in runs])} | {paper_txt} | {code(runs)} |")
    return "\n".join(lines)


def code(runs):
    """Which code made a row's runs: short git commits ('+' when the tree had uncommitted changes) or code hashes
    from their summaries; runs made before summaries recorded it show their version."""
    seen = []
    for r in runs:
        p = r.get("provenance") or {}
        tag = (p["git_commit"][:7] + ("+" if p.get("git_dirty") else "")) if "git_commit" in p else \
            (f"sha256:{p['code_sha256'][:8]}" if "code_sha256" in p else f"v{r.get('version', '?')}")
        if tag not in seen:
            seen.append(tag)
    return ", ".join(seen)


def series(groups, budget="short"):
    """What the plot draws: {(dataset, budget): {method: [(bits, mean, std), ...] sorted by bits}} of final top-1,
    W = A only, default settings only, the headline budget only (a panel per dataset). Variants (`lrq:...`,
    `faqd-frozen`, `akt+gdfq`), other budgets (smoke, the speed flags' A/B) and superseded runs stay in the tables."""
    out = defaultdict(lambda: defaultdict(list))
    for (method, ds, w, a, b), runs in groups.items():
        if w == a and base(method) == method and b == budget:
            out[(ds, b)][method].append((w, *mean_std([r["final_top1"] for r in runs])))
    return {k: {m: sorted(pts) for m, pts in v.items()} for k, v in sorted(out.items())}


def method_colors(panels):
    """One matplotlib colour per method, the same in every panel (per-panel cycling would recolour a method)."""
    methods = sorted({m for lines in panels.values() for m in lines})
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def pyplot():
    """matplotlib's pyplot (Agg backend), or None with one line when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed: no plots written (pip install matplotlib)")
        return None
    return plt


def plot(groups, path, budget="short"):
    plt = pyplot()
    if plt is None:
        return False
    panels = series(groups, budget)
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    color = method_colors(panels)
    for ax, ((ds, budget), lines) in zip(axes[0], panels.items()):
        for method, pts in sorted(lines.items()):
            real = grid.methods().get(base(method), {}).get("kind") == "label-free"  # real images: dashed
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        color=color[method], linestyle="--" if real else "-",
                        label=method + (" (real images)" if real else ""))
        teacher = sorted({r["teacher_top1"] for k, v in groups.items() if k[1] == ds and k[4] == budget for r in v})
        if len(teacher) == 1:
            ax.axhline(teacher[0], color="grey", linestyle="--", linewidth=1, label=f"FP teacher {teacher[0]:.2f}")
        ax.set_xticks(sorted({p[0] for pts in lines.values() for p in pts}))
        ax.set(title=f"{ds}, {budget} budget: final top-1 (mean ± std over seeds)", xlabel="bits (W = A)",
               ylabel="top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def base(row):
    """The script (method) a row's label comes from: 'akt+gdfq' -> 'akt', 'lrq:dkd' -> 'lrq'."""
    return METHOD_OF.get(row, row)


BEGIN, END = "<!-- headline tables: tools/report.py --readme -->", "<!-- end headline tables -->"
DOC_BEGIN, DOC_END = "<!-- results table: tools/report.py --docs -->", "<!-- end results table -->"


def replace_between(path, begin, end, body):
    """Replace what lies between the begin and end marker lines of a file. Returns an error message, or None."""
    text = open(path).read()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        return f"{path}: needs one '{begin}' line and one '{end}' line after it"
    head, rest = text.split(begin)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1])
    return None


def pivot(groups, budget="short"):
    """The README's headline: one table for the generator methods and one for the real-data ones, a row per
    method and a column per (dataset, W=A bits) that the grid has run, cells = final top-1 mean ± std (n seeds) of
    current code only ("—" where only superseded runs exist, "n/a" where none; no variants)."""
    cells = {(m, ds, w): runs for (m, ds, w, a, b), runs in groups.items() if b == budget and w == a and base(m) == m}
    out = []
    declared = grid.methods()  # table order: the papers' years
    kinds = list(dict.fromkeys(g["kind"] for g in declared.values()))
    for kind in kinds:
        title, methods = KIND_TITLES.get(kind, kind), [m for m, g in declared.items() if g["kind"] == kind]
        ran = {(m, ds, w) for (m, ds, w, a, b) in groups if w == a and (b == budget or b.startswith(budget + "-v"))}
        cols = sorted({(ds, w) for m, ds, w in ran if m in methods}, key=lambda c: (c[0] != "cifar10", c))
        if not cols:
            continue
        out += [f"| {title} | " + " | ".join(f"{'CIFAR-10' if ds == 'cifar10' else 'CIFAR-100'} W{w}A{w}"
                                              for ds, w in cols) + " | protocol |", "|---" * (len(cols) + 2) + "|"]
        for m in methods:
            row = [f"{fmt([r['final_top1'] for r in cells[(m, ds, w)]])} ({len(cells[(m, ds, w)])})"
                   if (m, ds, w) in cells else "—" if (m, ds, w) in ran else "n/a" for ds, w in cols]
            tag = protocol_tag([r for c in cols for r in cells.get((m, *c), [])])
            out.append(f"| {m} | " + " | ".join(row) + f" | {tag} |")
        best = []  # the state of the art beside our rows: the highest figure the methods' papers publish per column
        for ds, w in cols:
            found = [(pn[0], m) for m in methods if (pn := paper_number(m, m, ds, w))]
            best.append(f"{max(found)[0]:.2f} ({max(found)[1]}, paper budget)" if found else "—")
        if any(b != "—" for b in best):
            out.append("| best published (the papers' own figures) | " + " | ".join(best) + " | paper budget |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def protocol_tag(runs):
    """A row's protocol in brief, from its runs' summaries: quantizer family, student iterations x batch (one entry
    per distinct protocol; runs made before summaries recorded one are not described)."""
    tags = []
    for r in runs:
        p = r.get("protocol")
        if p:
            tag = f"{p['quantizer'].split(':')[0]}, {p['iterations']} × {p['batch']}"
            if tag not in tags:
                tags.append(tag)
    return "; ".join(tags) or "—"


def update_readme(path, groups, budget="short"):
    """The README's headline tables (current code, no variants: those are on the methods' pages) and, where the
    README holds its markers, the run-cost table."""
    err = replace_between(path, BEGIN, END, pivot(groups, budget))
    if not err and COST_BEGIN in open(path).read():
        err = replace_between(path, COST_BEGIN, COST_END, cost_table(groups))
    return err


def update_docs(docs_dir, groups):
    """Each docs/<method>.md holding the markers gets that method's rows (variants included) and figures; any other
    page holding the results-table markers (docs/reproduce.md) gets every row; a page holding the run-cost markers
    gets the cost table."""
    errors, done = [], []
    for name in sorted(os.listdir(docs_dir)):
        path = os.path.join(docs_dir, name)
        if not name.endswith(".md"):
            continue
        text = open(path).read()
        method = name[:-3] if name[:-3] in grid.methods() else None
        blocks = [(DOC_BEGIN, DOC_END, table, {"methods": {method} if method else None}),
                  (FIG_BEGIN, FIG_END, figures, {"method": method}) if method else None,
                  (COST_BEGIN, COST_END, cost_table, {}), (STAND_BEGIN, STAND_END, standings, {}),
                  (SPEED_BEGIN, SPEED_END, speed_table, {}), (ROOF_BEGIN, ROOF_END, roofline_table, {})]
        err, touched = None, False
        for begin, end, make, kwargs in filter(None, blocks):
            if begin in text and not err:
                err, touched = replace_between(path, begin, end, make(groups, **kwargs)), True
        if touched:
            (errors if err else done).append(err or path)
    return errors, done


SPEED_BEGIN, SPEED_END = "<!-- per-method speed: tools/report.py --docs -->", "<!-- end per-method speed -->"
SPEED_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "side_by_side_cpu.json")


def speed_table(groups, path=SPEED_JSON):
    """The per-method table of benchmarks/bench_methods.py --side-by-side's committed JSON: eager seconds per
    iteration and each flag set's speedup (median and min-max over the rounds, each round back to back)."""
    if not os.path.isfile(path):
        return "No side-by-side measurement is committed (benchmarks/side_by_side_cpu.json)."
    with open(path) as f:
        res = json.load(f)
    m = res["machine"]
    flags = [c for c, _ in sorted({c: 0 for r in res["methods"].values() for c in r["s_per_iter"]}.items())
             if c not in ("eager", "baseline")]
    base = res.get("baseline")
    lines = [f"Measured {res['date']} on {m['cpu']} ({m['cpu_capability']}, {m['threads']} threads, torch "
             f"{m['torch']}), {res['rounds']} rounds of {res['iters']} student iterations per run, each method at its "
             "paper batch (`python benchmarks/bench_methods.py --side-by-side`, from "
             "`benchmarks/side_by_side_cpu.json`). Speedup: eager's time over the flag set's in the same round, "
             "median (min-max over the rounds); above 1 is faster." + (
                 f" Last column: the baseline checkout's eager time (commit {base['commit']}) over this code's, in "
                 "the same rounds: what the code changes since gained." if base else ""), "",
             "| method | batch | eager s/iter, median (min-max) | " + " | ".join(f"`{c}`" for c in flags) + " |"
             + (f" eager over commit {base['commit']} |" if base else ""),
             "|---|---|---|" + "---|" * (len(flags) + bool(base))]

    def cell(v):
        return f"x{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
    for name, r in res["methods"].items():
        e = r["s_per_iter"]["eager"]
        cells = [cell(r["speedup"][c]) if c in r["speedup"] else "failed: " + r.get("errors", {}).get(
            c, "not measured") for c in flags]
        if base:
            cells.append(cell(r["speedup_over_baseline"]) if "speedup_over_baseline" in r else "not measured")
        lines.append(f"| {name} | {r['batch']} | {e['median']:.3f} ({e['min']:.3f}-{e['max']:.3f}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


ROOF_BEGIN, ROOF_END = "<!-- roofline: tools/report.py --docs -->", "<!-- end roofline -->"
ROOF_JSON = {kind: os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", name) for kind, name in
             (("float32", "methods_cpu_amd.json"), ("bfloat16", "methods_cpu_amd_bf16.json"))}


def roofline_table(groups, paths=None):
    """Each method's iteration against the machine's peak (benchmarks/bench_methods.py's committed JSONs: eager
    float32 against the float32 peak, --amp bf16 against the bfloat16 peak), and the 50 % goal per method."""
    paths = paths or ROOF_JSON
    if not all(os.path.isfile(p) for p in paths.values()):
        return "No roofline measurement is committed (" + ", ".join(
            f"benchmarks/{os.path.basename(p)}" for p in paths.values()) + ")."
    res = {k: json.load(open(p)) for k, p in paths.items()}
    f32, b16 = res["float32"], res["bfloat16"]
    m, pk = f32["machine"], {k: r["peak_flops"][k] / 1e9 for k, r in res.items()}
    lines = [f"Measured {f32.get('date', '')} on {m['cpu']} ({m['cpu_capability']}, {m['threads']} threads, torch "
             f"{m['torch']}), {f32['iters']} student iterations per timed epoch, each method at its paper batch "
             "(`python benchmarks/bench_methods.py`, eager and `--extra=\"--amp bf16\"`; from "
             f"`benchmarks/{os.path.basename(paths['float32'])}` and `benchmarks/{os.path.basename(paths['bfloat16'])}`"
             f"). Peak: the better of a 2048² matmul and a large 3x3 convolution, float32 {pk['float32']:.0f} "
             f"GFLOP/s, bfloat16 {pk['bfloat16']:.0f} GFLOP/s (matmul "
             f"{f32['peak_kernels']['float32']['matmul'] / 1e9:.0f} and "
             f"{b16['peak_kernels']['bfloat16']['matmul'] / 1e9:.0f}). FLOPs: convolutions and matrix products, "
             "forward and backward (`benchmarks/flop_count.py`).", "",
             "| method | batch | GFLOP / iteration | float32: s / iteration | GFLOP/s | of the float32 peak | "
             "bf16: s / iteration | GFLOP/s | of the bfloat16 peak |", "|---|---|---|---|---|---|---|---|---|"]
    for name in (k for k in f32 if isinstance(f32[k], dict) and "batch" in f32[k]):
        a, b = f32[name], b16.get(name, {})
        row = [name, str(a["batch"]), f"{a['flops_per_iter'] / 1e9:.1f}" if "flops_per_iter" in a else "-"]
        for r, kind in ((a, "fp32"), (b, "bf16")):
            if "achieved_flops" in r:
                row += [f"{r['s_per_iter']:.3f}", f"{r['achieved_flops'] / 1e9:.0f}",
                        f"{100 * r[f'fraction_of_{kind}_peak']:.0f} %"]
            else:
                row += [f"{r['s_per_iter']:.3f}" if "s_per_iter" in r else "-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


FIG_BEGIN, FIG_END = "<!-- figures: tools/report.py --docs -->", "<!-- end figures -->"
COST_BEGIN, COST_END = "<!-- run cost: tools/report.py --readme --docs -->", "<!-- end run cost -->"
CURVES_DIR = "curves"  # beside the --plot file: results/curves/<method>.png


def wall_minutes(r):
    return r["wall_seconds"] / 60 if r.get("wall_seconds") is not None else None


def images_per_s(r):
    """A run's training throughput: its summary's cost, else the median of its epochs' logged figure."""
    cost = (r.get("cost") or {}).get("images_per_s")
    if cost is not None:
        return cost
    xs = [m["charts/images_per_s"] for m in metrics(r) if m.get("charts/images_per_s")]
    return statistics.median(xs) if xs else None


def metrics(r):
    """The epochs a run logged (its metrics.jsonl), [] when the file is not there."""
    path = os.path.join(r.get("_dir", ""), "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def span(xs, digits=0, unit=""):
    """'a–b unit' (or 'a unit' when all are equal) of the values that exist; '—' when none does."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    lo, hi = f"{min(xs):.{digits}f}", f"{max(xs):.{digits}f}"
    return (lo if lo == hi else f"{lo}–{hi}") + unit


def signed(x):
    return f"{x:+.2f}"


def standing(groups, key):
    """Where a default row stands among the default rows of its kind in its cell (same dataset, bits and budget):
    'k of n', with the difference of final-top-1 means to the row above (or, for the first, its lead over the
    second)."""
    method, ds, w, a, budget = key
    kind = grid.methods().get(base(method), {}).get("kind")
    rivals = sorted(((mean_std([r["final_top1"] for r in runs])[0], m) for (m, d, ww, aa, b), runs in groups.items()
                     if (d, ww, aa, b) == (ds, w, a, budget) and base(m) == m
                     and grid.methods().get(m, {}).get("kind") == kind), reverse=True)
    if len(rivals) < 2 or base(method) != method:
        return "—"
    k = [m for _, m in rivals].index(method)
    if k == 0:
        return f"1 of {len(rivals)}, {signed(rivals[0][0] - rivals[1][0])} over {rivals[1][1]}"
    return f"{k + 1} of {len(rivals)}, {signed(rivals[k][0] - rivals[k - 1][0])} to {rivals[k - 1][1]}"


STAND_BEGIN, STAND_END = "<!-- standings: tools/report.py --docs -->", "<!-- end standings -->"


def standings(groups, budget="short"):
    """Every cell of the headline budget (default rows only), methods of a kind ranked by final top-1: mean ± std
    (seeds), the difference to the row above, and the calibrated -> final change of the means."""
    cells = defaultdict(list)
    for (row, ds, w, a, b), runs in groups.items():
        if b == budget and base(row) == row:
            kind = grid.methods().get(row, {}).get("kind", "?")
            cells[(kind, ds, w, a)].append((mean_std([r["final_top1"] for r in runs])[0], row, runs))
    lines = ["| kind | cell | rank | method | final top-1 | to the row above | calibrated → final (means) |",
             "|---" * 7 + "|"]
    kinds = list(dict.fromkeys(g["kind"] for g in grid.methods().values()))
    for kind, ds, w, a in sorted(cells, key=lambda c: (kinds.index(c[0]) if c[0] in kinds else 99, c[1], c[2])):
        ranked = sorted(cells[(kind, ds, w, a)], key=lambda x: -x[0])
        for k, (m, row, runs) in enumerate(ranked):
            cal = [r["calibrated_top1"] for r in runs if r.get("calibrated_top1") is not None]
            moved = f"{mean_std(cal)[0]:.2f} → {m:.2f}" if len(cal) == len(runs) else "—"
            lines.append(f"| {kind if k == 0 else ''} | {ds} W{w}A{a} | {k + 1} | {row} | "
                         f"{fmt([r['final_top1'] for r in runs])} ({len(runs)}) | "
                         f"{signed(m - ranked[k - 1][0]) if k else '—'} | {moved} |")
    return "\n".join(lines)


def figures(groups, method):
    """A method page's figures about its committed runs, one row per cell (variants included): seeds, calibrated
    and final means, the change calibrated -> final per seed (min and max), where the row stands among the methods
    of its kind in the cell, and the runs' wall time and images/s. Prose points here instead of copying them."""
    lines = ["| row | dataset | W/A | budget | seeds | calibrated → final (means) | change per seed | standing in "
             "the cell (final top-1) | wall time per run | images/s |", "|---" * 10 + "|"]
    for key in sorted(groups, key=lambda k: (k[4] != "short", k[4], k[1], k[0], k[2], k[3])):
        row, ds, w, a, budget = key
        if base(row) != method:
            continue
        runs = groups[key]
        pairs = [(r["calibrated_top1"], r["final_top1"]) for r in runs if r.get("calibrated_top1") is not None]
        if pairs:
            cal, fin = mean_std([c for c, _ in pairs])[0], mean_std([f for _, f in pairs])[0]
            change = [f - c for c, f in pairs]
            moved = f"{cal:.2f} → {fin:.2f}"
            per_seed = signed(change[0]) if len(change) == 1 else f"{signed(min(change))} to {signed(max(change))}"
        else:
            moved, per_seed = "—", "—"
        lines.append(f"| {row} | {ds} | W{w}A{a} | {budget} | {len(runs)} | {moved} | {per_seed} | "
                     f"{standing(groups, key)} | {span([wall_minutes(r) for r in runs], unit=' min')} | "
                     f"{span([images_per_s(r) for r in runs])} |")
    return "\n".join(lines)


def cost_table(groups):
    """Every method's runs per budget (variants included): how many, wall time per run and images/s (min–max),
    and the threads they ran with."""
    rows = defaultdict(list)
    for (row, *_, budget), runs in groups.items():
        rows[(base(row), budget)] += runs
    order = list(grid.methods())
    lines = ["| method | budget | runs | wall time per run | images/s | threads per run |", "|---" * 6 + "|"]
    for m, budget in sorted(rows, key=lambda k: (k[1] != "short", k[1], order.index(k[0]) if k[0] in order else 99)):
        runs = rows[(m, budget)]
        threads = sorted({r["args"].get("threads") for r in runs}, key=str)  # 0: torch's default (every core)
        lines.append(f"| {m} | {budget} | {len(runs)} | {span([wall_minutes(r) for r in runs], unit=' min')} | "
                     f"{span([images_per_s(r) for r in runs])} | "
                     f"{', '.join('all' if t == 0 else '—' if t is None else str(t) for t in threads)} |")
    return "\n".join(lines)


def curves(groups, out_dir, budget="short"):
    """results/curves/<method>.png: test top-1 per epoch of every default row at the headline budget, a panel per
    dataset, a line per bit-width (mean over seeds, min–max band). Returns the paths written."""
    plt = pyplot()
    if plt is None:
        return []
    per = defaultdict(lambda: defaultdict(dict))  # method -> dataset -> (w, a) -> runs
    for (row, ds, w, a, b), runs in groups.items():
        if b == budget and base(row) == row:
            per[row][ds][(w, a)] = runs
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for method, panels in sorted(per.items()):
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, (ds, cells) in zip(axes[0], sorted(panels.items())):
            for i, ((w, a), runs) in enumerate(sorted(cells.items())):
                by_epoch = defaultdict(list)
                for r in runs:
                    for m in metrics(r):
                        if m.get("eval/top1") is not None:
                            by_epoch[m["epoch"] + 1].append(m["eval/top1"])
                ep = sorted(e for e, xs in by_epoch.items() if len(xs) == len(runs))  # epochs every seed reached
                if not ep:
                    continue
                mean = [statistics.fmean(by_epoch[e]) for e in ep]
                ax.plot(ep, mean, marker=".", color=f"C{i}", label=f"W{w}A{a} ({len(runs)} seeds, min–max band)")
                ax.fill_between(ep, [min(by_epoch[e]) for e in ep], [max(by_epoch[e]) for e in ep], color=f"C{i}",
                                alpha=0.2)
            teacher = sorted({r["teacher_top1"] for runs in cells.values() for r in runs})
            if len(teacher) == 1:
                ax.axhline(teacher[0], color="grey", linestyle="--", linewidth=1, label=f"FP teacher {teacher[0]:.2f}")
            ax.set(title=f"{method}, {ds}, {budget} budget: test top-1 per epoch", xlabel="epoch", ylabel="top-1 (%)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{method}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


COST_FREE = ("teacher_top1",)  # protocol fields a new run re-measures (compared as results, not as the protocol)


def check(new_groups, old_groups, margin, floor=0.0):
    """Drift check: every new run against the committed cell of the same row, dataset, bits, budget and protocol.
    A run drifts when its final top-1 lies outside the committed mean ± 3 std (n >= 3 committed runs; never narrower
    than ± `floor` points, the float-rounding spread between CPUs and thread counts) or mean ± `margin` points
    (n < 3). Returns (lines, number of drifted runs); cells with nothing committed, or committed under another
    protocol, are listed and not counted as drift."""
    lines, drifted = [], 0
    for key, runs in sorted(new_groups.items()):
        cell = " ".join(map(str, key))
        old = old_groups.get(key, [])
        proto = [r.get("protocol") or {} for r in runs + old]
        fields = sorted({k for p in proto for k in p if k not in COST_FREE
                         and len({repr(q.get(k)) for q in proto if q}) > 1})
        if not old:
            lines.append(f"new    {cell}: nothing committed to compare with")
            continue
        if fields:
            lines.append(f"skip   {cell}: committed under another protocol ({', '.join(fields)} differ)")
            continue
        m, s = mean_std([r["final_top1"] for r in old])
        band, how = (3 * s, "3 std") if len(old) >= 3 else (margin, f"margin {margin:g}, n < 3")
        if len(old) >= 3 and band < floor:
            band, how = floor, f"floor {floor:g} > 3 std"
        for r in runs:
            x, ok = r["final_top1"], abs(r["final_top1"] - m) <= band + 1e-9
            drifted += not ok
            lines.append(f"{'ok    ' if ok else 'DRIFT '} {cell} seed {r['args'].get('seed')}: {x:.2f} vs committed "
                         f"{m:.2f} ± {band:.2f} ({how}, {len(old)} runs)")
    return lines, drifted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="results/runs", help="folder searched for summary.json files")
    p.add_argument("--out", default="results/RESULTS.md", help="markdown table to write")
    p.add_argument("--plot", default="results/accuracy_vs_bits.png", help="plot to write (needs matplotlib)")
    p.add_argument("--readme", help="also refresh the headline tables between the markers of this README")
    p.add_argument("--docs", help="also refresh each <method>.md in this folder that holds the results-table markers")
    p.add_argument("--budget", default="short", help="the budget of the README's headline tables")
    p.add_argument("--check", metavar="NEW_RUNS",
                   help="drift check instead of a report: the runs under NEW_RUNS (NEW_RUNS/BUDGET/NAME) against the "
                        "committed ones under --runs; exit 1 if any drifted")
    p.add_argument("--margin", type=float, default=2.0,
                   help="--check: allowed distance in top-1 points from a cell with fewer than 3 committed runs")
    p.add_argument("--floor", type=float, default=0.0,
                   help="--check: the narrowest band allowed around a cell with 3 or more committed runs, in top-1 "
                        "points (3 std of near-identical seeds is narrower than another CPU's rounding)")
    a = p.parse_args(argv)
    if a.check:
        lines, drifted = check(collect(a.check), collect(a.runs), a.margin, a.floor)
        print("\n".join(lines) or f"report: no runs under {a.check}")
        print(f"report: {drifted} of {sum(line.startswith(('ok', 'DRIFT')) for line in lines)} runs drifted")
        sys.exit(1 if drifted else 0)
    groups = collect(a.runs)
    mixed = mixed_protocols(groups)
    if mixed:  # one cell, one protocol: refuse rather than average incomparable runs
        for line in mixed:
            print(f"report: {line}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("# cleanqd results\n\nGenerated by `tools/report.py` from the `summary.json` files under "
                f"`{a.runs}/` (budget = the folder below it; see docs/reproduce.md for each budget's recipe; a budget "
                "ending in -vN holds runs made with code that has changed since). Top-1 in %, "
                "mean ± sample std over seeds; 'final' is the last epoch, 'best' the best epoch (selected on the test "
                "set, as the papers do); 'calibrated' is the quantized student before any training step. The 'paper' "
                "column is the published number (pytorchcv teachers, paper recipe), not ours.\n\n")
        f.write(table(groups) + "\n")
    wrote = plot(groups, a.plot, a.budget)
    drawn = curves(groups, os.path.join(os.path.dirname(a.plot) or ".", CURVES_DIR), a.budget) if wrote else []
    print(f"report: {sum(len(v) for v in groups.values())} runs in {len(groups)} rows -> {a.out}"
          + (f", {a.plot}" if wrote else "") + (f", {len(drawn)} learning-curve plots" if drawn else ""))
    if a.readme:
        err = update_readme(a.readme, groups, a.budget)
        if err:  # bad input: one line, exit code 2 (the table and plot above are written)
            print(f"report: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"report: table refreshed in {a.readme}")
    if a.docs:
        errors, done = update_docs(a.docs, groups)
        for err in errors:
            print(f"report: {err}", file=sys.stderr)
        if errors:
            sys.exit(2)
        print(f"report: tables refreshed in {', '.join(done)}")


if __name__ == "__main__":
    try:
        main()
    except grid.GridError as e:  # a script's GRID or variant that cannot be read: one line naming file and field
        print(f"report: {e}", file=sys.stderr)
        sys.exit(2)
