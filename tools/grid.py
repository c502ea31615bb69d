"""What the grid knows about each method, read from the method scripts themselves: every *.py next to common.py that
defines a module-level GRID dict is a method, named after its file. GRID gives its kind (which budget run_all.sh
gives it: "zero-shot" or "label-free"), the bit-widths the grid runs by default and those the script supports
(W = A), the paper's year (table order), optionally flags that a budget adds for this method ("budget_args":
{budget: "--flag value ..."}, e.g. for a stage the shared budget does not cover) and published numbers ("paper":
{"cifar10 W4A4": [top-1, source]}, "variant_paper": {variant suffix: {...}}) or a "note". The script's `variant(args)`
function names a run's row from its args. Nothing is imported: GRID is evaluated and `variant` executed on their own
(so both must use nothing but literals, METHOD and builtins), which keeps this fast and free of torch.

    python tools/grid.py            # one line per method: name kind default-bits supported-bits
    python tools/grid.py --budget-args short   # one line per method with extra flags: name<TAB>flags
"""
import ast
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def _grid_node(tree):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "GRID" for t in node.targets):
            return node.value
    return None


def methods(root=ROOT):
    """{method name: GRID dict} for every script in root that declares a GRID, in table order (year, then name)."""
    out = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name == "common.py":
            continue
        node = _grid_node(_parse(os.path.join(root, name)))
        if node is not None:
            out[name[:-3]] = eval(compile(ast.Expression(node), name, "eval"), {"__builtins__": {}})  # noqa: S307
    return dict(sorted(out.items(), key=lambda kv: (kv[1].get("year", 0), kv[0])))


@functools.cache
def _variant_fn(path, method):
    for node in _parse(path).body:
        if isinstance(node, ast.FunctionDef) and node.name == "variant":
            scope = {"METHOD": method}
            exec(compile(ast.Module([node], []), path, "exec"), scope)  # noqa: S102 - our own script's function
            return scope["variant"]
    return lambda args: method


def label(args, root=ROOT):
    """A run's row label: its script's variant(args), or the method name when the script is gone."""
    method = args["method"]
    path = os.path.join(root, f"{method}.py")
    return _variant_fn(path, method)(args) if os.path.isfile(path) else method


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--budget-args":
        for name, g in methods(sys.argv[3] if len(sys.argv) > 3 else ROOT).items():
            if g.get("budget_args", {}).get(sys.argv[2]):
                print(f"{name}\t{g['budget_args'][sys.argv[2]]}")
        sys.exit(0)
    root = sys.argv[1] if len(sys.argv) > 1 else ROOT
    for name, g in methods(root).items():
        print(name, g["kind"], ",".join(map(str, g["bits"])), ",".join(map(str, g["supported_bits"])))
