"""What the grid knows about each method, read from the method scripts themselves: every *.py next to common.py that
defines a module-level GRID dict is a method, named after its file. GRID gives its kind (which budget run_all.sh
gives it: "zero-shot" or "label-free"), the bit-widths the grid runs by default and those the script supports
(W = A), the paper's year (table order), optionally flags that a budget adds for this method ("budget_args":
{budget: "--flag value ..."}, e.g. for a stage the shared budget does not cover), and published numbers ("paper":
{"cifar10 W4A4": [top-1, source]}, "variant_paper": {variant suffix: {...}}, or a "note") together with
"paper_for", the method they were published for: a renamed copy of a script (another METHOD) shows none of them.
The script's `variant(args)` function names a run's row from its args. Nothing is imported: GRID is evaluated and
`variant` executed on their own, with the script's module-level constants (NAME = literal), METHOD and a few
builtins in scope, which keeps this fast and free of torch. A malformed GRID or variant is one line naming the file
and the field (exit 2).

    python tools/grid.py                        # one line per method: name kind default-bits supported-bits
    python tools/grid.py --budget-args short    # one line per method with extra flags: name<TAB>flags
"""
import argparse
import ast
import builtins
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("zero-shot", "label-free")
SAFE_BUILTINS = {b: getattr(builtins, b) for b in (
    "range", "len", "dict", "list", "tuple", "zip", "sorted", "str", "int", "float", "round", "min", "max", "any",
    "all", "enumerate", "getattr", "isinstance", "bool", "set")}


class GridError(Exception):
    """A script's GRID or variant that cannot be read: the message names the file and the field."""


@functools.cache
def _parse(path):
    with open(path) as f:
        try:
            return ast.parse(f.read(), path)
        except SyntaxError as e:
            raise GridError(f"{os.path.basename(path)}: does not parse (line {e.lineno}: {e.msg})") from None


def _grid_node(tree):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "GRID" for t in node.targets):
            return node.value
    return None


@functools.cache
def _constants(path, method):
    """The script's module-level constants that are plain literals (NAME = 0.5, NAME = ("a", "b")), and METHOD."""
    scope = {}
    for node in _parse(path).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                scope[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                pass
    return {**scope, "METHOD": method}


def _check(name, g):
    """GRID's fields, each one line naming the file and the field when wrong."""
    where = f"{name}.py: GRID"
    if not isinstance(g, dict):
        raise GridError(f"{where} is not a dict")
    if g.get("kind") not in KINDS:
        raise GridError(f"{where} field 'kind' is {g.get('kind')!r}; expected one of {', '.join(KINDS)}")
    for field in ("bits", "supported_bits"):
        v = g.get(field)
        if not (isinstance(v, (list, tuple)) and v and all(isinstance(b, int) and 1 <= b <= 32 for b in v)):
            raise GridError(f"{where} field '{field}' is {v!r}; expected a list of bit-widths, e.g. [2, 3, 4]")
    if not set(g["bits"]) <= set(g["supported_bits"]):
        raise GridError(f"{where} field 'bits' {g['bits']} is not within 'supported_bits' {g['supported_bits']}")
    if not isinstance(g.get("year", 0), int):
        raise GridError(f"{where} field 'year' is {g['year']!r}; expected the paper's year as an integer")
    tables = [("paper", g.get("paper", {}))] + [(f"variant_paper[{k!r}]", v)
                                                for k, v in (g.get("variant_paper") or {}).items()]
    for field, table in tables:
        if not isinstance(table, dict) or not all(
                isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) == 2
                and isinstance(v[0], (int, float)) and isinstance(v[1], str) for k, v in table.items()):
            raise GridError(f"{where} field '{field}' must map 'dataset WxAx' to [top-1, source]")
    if (g.get("paper") or g.get("variant_paper") or g.get("note")) and not isinstance(g.get("paper_for"), str):
        raise GridError(f"{where} has published numbers or a note but no 'paper_for' (the method they were "
                        f"published for, e.g. \"paper_for\": \"{name}\")")
    if not isinstance(g.get("budget_args", {}), dict):
        raise GridError(f"{where} field 'budget_args' must map a budget to a string of flags")


@functools.cache
def methods(root=ROOT):
    """{method name: GRID dict} for every script in root that declares a GRID, in table order (year, then name).
    Published numbers ('paper', 'variant_paper', 'note') are kept only where 'paper_for' is the script's name."""
    out = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name == "common.py":
            continue
        path = os.path.join(root, name)
        node = _grid_node(_parse(path))
        if node is None:
            continue
        method = name[:-3]
        scope = {**_constants(path, method), "__builtins__": SAFE_BUILTINS}
        try:
            g = eval(compile(ast.Expression(node), name, "eval"), scope)  # noqa: S307 - our own script's literal
        except Exception as e:  # noqa: BLE001 - any failure is the script's GRID, said in one line
            raise GridError(f"{name}: GRID cannot be evaluated ({type(e).__name__}: {e}); it may use only literals, "
                            "module-level constants, METHOD and simple builtins") from None
        _check(method, g)
        if g.get("paper_for") != method:  # a renamed copy: the numbers are another method's
            g = {k: v for k, v in g.items() if k not in ("paper", "variant_paper", "note")}
        out[method] = g
    return dict(sorted(out.items(), key=lambda kv: (kv[1].get("year", 0), kv[0])))


@functools.cache
def _variant_fn(path, method):
    for node in _parse(path).body:
        if isinstance(node, ast.FunctionDef) and node.name == "variant":
            scope = {**_constants(path, method), "__builtins__": SAFE_BUILTINS}
            exec(compile(ast.Module([node], []), path, "exec"), scope)  # noqa: S102 - our own script's function
            return scope["variant"]
    return lambda args: method


def label(args, root=ROOT):
    """A run's row label: its script's variant(args), or the method name when the script is gone."""
    method = args["method"]
    path = os.path.join(root, f"{method}.py")
    if not os.path.isfile(path):
        return method
    try:
        row = _variant_fn(path, method)(args)
    except Exception as e:  # noqa: BLE001 - a broken variant() is the script's, said in one line
        raise GridError(f"{method}.py: variant(args) failed ({type(e).__name__}: {e}); it may use only the args "
                        "dict, module-level constants, METHOD and simple builtins") from None
    if not isinstance(row, str) or not row:
        raise GridError(f"{method}.py: variant(args) returned {row!r}; expected the row's name (a string)")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description="List the methods the grid knows (every script with a GRID), or the "
                                            "flags a budget adds per method.")
    p.add_argument("root", nargs="?", default=ROOT, help="folder holding the method scripts (default: this checkout)")
    p.add_argument("--budget-args", metavar="BUDGET",
                   help="print name<TAB>flags for each method whose GRID adds flags in this budget")
    a = p.parse_args(argv)
    try:
        found = methods(a.root)
    except (GridError, OSError) as e:
        print(f"grid.py: {e}", file=sys.stderr)
        sys.exit(2)
    for name, g in found.items():
        if a.budget_args is None:
            print(name, g["kind"], ",".join(map(str, g["bits"])), ",".join(map(str, g["supported_bits"])))
        elif g.get("budget_args", {}).get(a.budget_args):
            print(f"{name}\t{g['budget_args'][a.budget_args]}")


if __name__ == "__main__":
    main()
