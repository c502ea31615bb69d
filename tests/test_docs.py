"""The prose stays true where it can be checked: every relative link and image in README.md and docs/ resolves
(anchors included); every flag in a documented command exists in that command's parser; every default a method page
states (`--flag VALUE (default ...)`, or a span of flags on a line that says 'default') equals the parser's; every
repository path in backticks exists; the generated blocks are current (rebuilding them changes nothing); and no
measured figure is written by hand into current-state prose: figures about the committed results live in blocks
that tools/report.py writes, every other measurement in a dated record (docs/records/, or a page's "## Records"
section), and the papers' own numbers under a "Published" heading."""
import argparse
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
RECORDS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "records", "*.md")))
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")) if not p.endswith("common.py"))
TOP_DIRS = ("tests/", "docs/", "tools/", "benchmarks/", "results/", ".ci/")


def text(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def anchors(page):
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text(page), re.M)}


@pytest.mark.parametrize("page", PAGES + RECORDS)
def test_links_and_images_resolve(page):
    bad = []
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text(page)):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(os.path.relpath(full, ROOT)):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{page}: {bad}"


def parser_of(script):
    """The argparse parser a method script builds (captured at its parse_args call)."""
    module = importlib.import_module(script)

    class Captured(Exception):
        pass

    def capture(p, argv=None, bits=None, dataset_defaults=None):
        raise Captured(p)
    saved = module.parse_args
    module.parse_args = capture
    try:
        module.parse([])
    except Captured as c:
        return c.args[0]
    finally:
        module.parse_args = saved
    raise AssertionError(f"{script}.parse() did not call parse_args")


def options(command):
    """The long options a command accepts: scripts from their parser, other tools from their --help."""
    if command in SCRIPTS and hasattr(importlib.import_module(command), "parse"):
        return {s for a in parser_of(command)._actions for s in a.option_strings}
    args = ["bash", "run_all.sh", "--help"] if command == "run_all.sh" else [sys.executable, command, "--help"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", out))


def commands(page):
    """(program, [flags]) for every `python X.py ...` / `./run_all.sh ...` in the page (code blocks and spans)."""
    t = text(page).replace("\\\n", " ")
    out = []
    for m in re.finditer(r"(?:python (?:-m \S+ )?|\./)((?:[\w/]+/)?[\w]+\.(?:py|sh))([^\n`#|]*)", t):
        prog = m.group(1)
        prog = prog[:-3] if prog.endswith(".py") and "/" not in prog else prog
        args = re.sub(r'"[^"]*"', "", m.group(2))  # a quoted value (e.g. --slurm "...") holds another program's flags
        out.append((prog, re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", args)))
    return out


@pytest.mark.parametrize("page", PAGES)
def test_documented_commands_use_existing_flags(page):
    bad = []
    for prog, flags in commands(page):
        if prog not in SCRIPTS and not os.path.isfile(os.path.join(ROOT, prog)):
            if prog.startswith(("tools/", "benchmarks/")) or prog in ("run_all.sh",):
                bad.append(f"{prog}: no such program")
            continue  # a reference repository's script, quoted
        known = options(prog)
        bad += [f"{prog} {f}" for f in flags if f not in known]
    assert not bad, f"{page}: flags not in the parser: {sorted(set(bad))}"


def stated_defaults(page):
    """(flag, value) pairs a page states as defaults: a span `--flag VALUE` followed by "(default", and every pair of a
    span listing several `--flag VALUE` pairs on a prose line that says 'default' ("Main flags (defaults = paper)")."""
    out = []
    t = text(page)
    pair = r"(--[a-z0-9-]+) ([^\s`-][^\s`]*(?: [0-9.][^\s`]*)*)"
    for flag, value in re.findall(r"`" + pair + r"` \(default", t):
        out.append((flag, value))
    prose = "\n".join(x for x in t.splitlines() if not x.lstrip().startswith("|"))  # tables list variants, not defaults
    for para in re.split(r"\n\s*\n", prose):
        for line in re.split(r"(?<=[.;])\s+(?=[A-Z])", para.replace("\n", " ")):
            if "default" not in line.lower():
                continue
            for span in re.findall(r"`([^`]+)`", line):
                pairs = re.findall(pair, span)
                if len(pairs) >= 2 and not span.startswith(("python", "./")):
                    out += pairs
    return [(f, v) for f, v in out if "|" not in v and not v.isupper()]


def same(action, value):
    try:
        if action.nargs in ("*", "+"):
            return [float(v) for v in value.split()] == [float(v) for v in action.default]
        if isinstance(action.default, float) or action.type is float:
            return float(value) == float(action.default)
        return str(action.default) == value or (action.type is not None and action.type(value) == action.default)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


@pytest.mark.parametrize("script", [s for s in SCRIPTS if os.path.isfile(os.path.join(ROOT, "docs", f"{s}.md"))])
def test_defaults_stated_on_a_method_page_are_the_parsers(script):
    actions = {s: a for a in parser_of(script)._actions for s in a.option_strings}
    pairs = stated_defaults(f"docs/{script}.md")
    bad = [f"{f} {v} (parser: {actions[f].default})" for f, v in pairs if f in actions and not same(actions[f], v)]
    assert not bad, f"docs/{script}.md states defaults that differ from {script}.py: {bad}"


def test_the_defaults_check_can_fail():
    """The checker itself: a stated default that differs from the parser's is caught."""
    actions = {s: a for a in parser_of("gdfq")._actions for s in a.option_strings}
    assert same(actions["--epochs"], "400") and not same(actions["--epochs"], "300")
    assert same(actions["--milestones"], "0.25 0.5 0.75") and same(actions["--lr-s"], "1e-4")
    assert ("--epochs", "400") in stated_defaults("docs/gdfq.md")


def expand(path):
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in expand(path[:m.start()] + alt + path[m.end():])]


@pytest.mark.parametrize("page", PAGES + RECORDS)
def test_repository_paths_in_backticks_exist(page):
    bad = []
    for span in re.findall(r"`([^`\s]+)`", text(page)):
        path = span.rstrip(".,:;")
        if not path.startswith(TOP_DIRS) or re.search(r"[*<>]|RUN|BUDGET|NAME|METHOD|/\.\.\.", path):
            continue
        if not all(os.path.exists(os.path.join(ROOT, p)) for p in expand(path)):
            bad.append(path)
    assert not bad, f"{page}: paths that do not exist: {bad}"


@pytest.mark.slow
def test_generated_tables_are_current(tmp_path):
    """tools/report.py rebuilt over the committed runs changes nothing in README.md, docs/ or results/RESULTS.md."""
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    r = subprocess.run([sys.executable, "tools/report.py", "--runs", "results/runs", "--out", str(tmp_path / "R.md"),
                        "--plot", str(tmp_path / "p.png"), "--readme", str(tmp_path / "README.md"),
                        "--docs", str(tmp_path / "docs")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stale = [p for p in PAGES if open(os.path.join(ROOT, p)).read() != open(tmp_path / p).read()]
    with open(os.path.join(ROOT, "results", "RESULTS.md")) as f:
        if f.read() != (tmp_path / "R.md").read_text():
            stale.append("results/RESULTS.md")
    assert not stale, f"rebuild with tools/report.py (see docs/reproduce.md): stale {stale}"


# A measured figure: a mean ± std, a before -> after change, a range of minutes, a seed count ("(3 seeds)", "3 seeds").
FIGURE = re.compile(r"\d+(?:\.\d+)? ± \d+(?:\.\d+)?|\d+\.\d+ → \d+\.\d+|\b\d+(?:\.\d+)? ?[–-] ?\d+(?:\.\d+)? ?min\b"
                    r"|\(\d+ seeds?\)|\b\d+ seeds\b")
GENERATED = re.compile(r"<!-- [^\n]*: tools/report\.py[^\n]*-->.*?<!-- end [^\n]*-->", re.S)
DATED = re.compile(r"^#{2,3} \d{4}-\d{2}-\d{2}\b")


def current_state(page_text):
    """A page's current-state prose: without its generated blocks, its "## Records" section and "Published" sections
    (the papers' own numbers), each up to the next heading of its level or above."""
    t = GENERATED.sub("", page_text)
    t = t.split("\n## Records\n")[0]
    out, skip = [], None
    for line in t.splitlines():
        m = re.match(r"^(#+) ", line)
        if m and skip is not None and len(m.group(1)) <= skip:
            skip = None
        if m and "published" in line.lower():
            skip = len(m.group(1))
        if skip is None:
            out.append(line)
    return "\n".join(out)


def hand_written_figures(page_text):
    return [(n + 1, m.group(0)) for n, line in enumerate(current_state(page_text).splitlines())
            for m in FIGURE.finditer(line)]


@pytest.mark.parametrize("page", PAGES)
def test_no_hand_written_figures_in_current_state_prose(page):
    found = hand_written_figures(text(page))
    assert not found, (f"{page}: measured figures written by hand outside generated blocks and dated records (line "
                       f"of the current-state text, figure): {found}; let tools/report.py write it, or date a record")


def test_an_inserted_hand_written_figure_fails():
    """The check itself: a sentence copying a committed figure into a method page's prose is caught; the same sentence
    inside a generated block, a dated record or a Published section is not."""
    page = text("docs/gdfq.md")
    assert hand_written_figures(page) == []
    for sentence, figure in [("GDFQ ends at 83.25 ± 0.60 (5 seeds).", "83.25 ± 0.60"),
                             ("Calibrated students move 85.09 → 83.25 here.", "85.09 → 83.25"),
                             ("A short run takes 15–23 min on one thread.", "15–23 min"),
                             ("Every cell now has 3 seeds.", "3 seeds")]:
        bad = page.replace("## Overview\n", "## Overview\n\n" + sentence + "\n", 1)
        assert figure in [f for _, f in hand_written_figures(bad)], sentence
        inside = page.replace("<!-- end figures -->", sentence + "\n<!-- end figures -->", 1)
        assert hand_written_figures(inside) == []
        dated = page + "\n## Records\n\n### 2026-12-06 · x\n\n" + sentence + "\n"
        assert hand_written_figures(dated) == []
        published = page.replace("### Published numbers\n", "### Published numbers\n\n" + sentence + "\n", 1)
        assert hand_written_figures(published) == []


def records_of(page):
    """(heading, body) of every record: each '## ' section of a docs/records/ file, each '### ' section under a page's
    '## Records'."""
    t = text(page)
    if page in RECORDS:
        parts = re.split(r"^(## .*)$", t, flags=re.M)
    elif "\n## Records\n" in t:
        parts = re.split(r"^(### .*)$", t.split("\n## Records\n", 1)[1], flags=re.M)
    else:
        return []
    return list(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("page", RECORDS + [p for p in PAGES if "\n## Records\n" in text(p)])
def test_records_are_dated_with_cpu_commit_and_command(page):
    recs = records_of(page)
    assert recs, f"{page}: no records"
    bad = []
    for heading, body in recs:
        first = body.strip().splitlines()[0] if body.strip() else ""
        if not DATED.match(heading):
            bad.append(f"{heading!r}: starts without its date (YYYY-MM-DD)")
        elif not re.search(r"commit [0-9a-f]{7}", first) or "CPU:" not in first or \
                not re.search(r"command|`python |\./run_all", first):
            bad.append(f"{heading!r}: its first line names no commit, CPU or command: {first!r}")
    assert not bad, f"{page}: {bad}"


def test_the_records_check_can_fail():
    assert DATED.match("## 2026-12-06 · x") and not DATED.match("## Now: x")
    assert not DATED.match("### Today · side by side")


def test_protocol_lists_every_flag_a_resume_may_change():
    from common import RESUME_MAY_CHANGE
    page = " ".join(text("docs/protocol.md").split())
    sentence = page[page.index("Only these may change:"):].split(". ")[0]
    missing = [f for f in sorted(RESUME_MAY_CHANGE - {"resume"}) if f"--{f.replace('_', '-')}`" not in sentence]
    assert not missing, f"docs/protocol.md: the flags a resume may change omit {missing}"
