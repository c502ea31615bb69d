"""The code difference between two runs, from the copies each run saved of the code that made it (RUN_DIR/code/:
the script and common.py, and code/resumed-TIME/ when a resume ran other code). Prints a unified diff per file, or
that the code is the same; exit 0 either way, 2 when a run holds no saved code.

    python tools/code_diff.py runs/RUN_A runs/RUN_B
"""
import argparse
import difflib
import os
import sys


def saved_code(run_dir):
    """{file name: text} of the code a run started with (RUN_DIR/code/*.py)."""
    code = os.path.join(run_dir, "code")
    if not os.path.isdir(code):
        print(f"code_diff.py: {run_dir} holds no code/ folder (runs save their code since cleanqd 0.2; an older run "
              "names its commit in summary.json's provenance)", file=sys.stderr)
        sys.exit(2)
    out = {}
    for name in sorted(os.listdir(code)):
        if name.endswith(".py"):
            with open(os.path.join(code, name)) as f:
                out[name] = f.read()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", help="a run directory")
    p.add_argument("run_b", help="another run directory")
    a = p.parse_args(argv)
    code_a, code_b = saved_code(a.run_a), saved_code(a.run_b)
    scripts_a = [n for n in code_a if n != "common.py"]
    scripts_b = [n for n in code_b if n != "common.py"]
    pairs = [("common.py", "common.py")]
    if len(scripts_a) == 1 and len(scripts_b) == 1:  # a renamed copy is compared with its original
        pairs.append((scripts_a[0], scripts_b[0]))
    else:
        pairs += [(n, n) for n in sorted(set(scripts_a) | set(scripts_b))]
    same = True
    for na, nb in pairs:
        left, right = code_a.get(na, ""), code_b.get(nb, "")
        diff = list(difflib.unified_diff(left.splitlines(keepends=True), right.splitlines(keepends=True),
                                         f"{a.run_a}/code/{na}", f"{a.run_b}/code/{nb}"))
        if diff:
            same = False
            sys.stdout.writelines(diff)
    if same:
        print(f"the same code: {', '.join(sorted(set(code_a)))}")


if __name__ == "__main__":
    main()
