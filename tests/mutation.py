"""Mutation testing of the routing, experts, indicator, key-map and node code (mutmut 3).

Not part of CI (minutes to an hour). Run it when changing those modules or their tests:

    pip install -r requirements-mutation.txt   # into the env that runs the tests
    python tests/mutation.py core
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tests/mutation.py nodes

Each run works in a fresh copy of the tracked files (default /tmp/fera-mutation-<target>), so the
worktree never gets a mutants/ folder and core and nodes runs do not share state. mutmut names a
mutant by its file's path, and the host tests import the glue as the package ComfyUI sees
(`fera_pack.nodes.routing`, tests/comfy/comfy_host.py), so for the nodes target the copy is laid out
as `fera_pack/...` and the two names agree. The config is
written to that copy's setup.cfg (mutmut reads pyproject.toml's [tool.mutmut] first; the copy's
pyproject has none). It prints every surviving mutant and the score = killed / all mutants;
`mutmut show NAME` in the copy prints a mutant's diff.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))
from comfy_host import PACK_NAME  # noqa: E402

PYTHONPATH = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["pythonpath"]

# target: (source folders copied into mutants/, files mutated, test files run, needs ComfyUI)
TARGETS = {
    "core": (["fera_core"], ["fera_core/router.py", "fera_core/experts.py", "fera_core/indicator.py"],
             ["tests/core/test_router.py", "tests/core/test_experts.py", "tests/core/test_indicator.py",
              "tests/core/test_model.py", "tests/core/test_fecl.py", "tests/core/test_reference_parity.py",
              "tests/core/test_core_contracts.py"], False),
    "nodes": (["nodes", "fera_core"], ["nodes/routing.py", "nodes/module_paths.py", "nodes/adapter_nodes.py"],
              ["tests/comfy/test_apply_controls.py", "tests/comfy/test_families.py", "tests/comfy/test_module_paths.py",
               "tests/comfy/test_adapter_nodes.py", "tests/comfy/test_routing.py", "tests/comfy/test_tracing.py",
               "tests/comfy/test_train_nodes.py"], True),
}


def _setup_cfg(sources, mutate, tests, extra, prefix) -> str:
    def lines(values):
        return "".join(f"\n    {v}" for v in values)
    return (
        "[mutmut]\n"
        f"source_paths ={lines(sources)}\n"
        f"only_mutate ={lines(mutate)}\n"
        f"pytest_add_cli_args_test_selection ={lines(tests)}\n"
        # the fast tests only: slow ones write GB-sized checkpoints or start servers
        f"pytest_add_cli_args =\n    -m\n    not slow\n    -p\n    no:cacheprovider{lines(extra)}\n"
        f"also_copy ={lines(prefix + p for p in ('tests', '__init__.py', 'web', 'workflows'))}\n"
        # torch is not fork-safe once it has started its thread pools
        "process_isolation = forkserver\n"
        "use_git_change_detection = false\n"
        # the tests import fera_core and their helpers top-level too (pyproject's pythonpath, which the copy lacks)
        + (f"\n[tool:pytest]\npythonpath ={lines(os.path.normpath(prefix + p) for p in PYTHONPATH)}\n" if prefix else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--workdir", type=Path, help="default: /tmp/fera-mutation-<target>")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--mutants", default="", help="comma-separated mutant names or globs to run (default: all)")
    args, pytest_args = parser.parse_known_args()  # the rest goes to pytest, e.g. -- --deselect ID
    pytest_args = [a for a in pytest_args if a != "--"]
    sources, mutate, tests, needs_comfy = TARGETS[args.target]
    if needs_comfy and not os.environ.get("COMFYUI_PATH"):
        parser.error(f"target {args.target!r} mutates host glue: set COMFYUI_PATH to a ComfyUI checkout")
    work = args.workdir or Path(f"/tmp/fera-mutation-{args.target}")
    if work.exists():
        shutil.rmtree(work)
    prefix = f"{PACK_NAME}/" if needs_comfy else ""  # the package name the host tests import
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (work / prefix / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / prefix / name)
    (work / "setup.cfg").write_text(_setup_cfg(
        [prefix + s for s in sources], [prefix + m for m in mutate],
        [prefix + t for t in tests if (ROOT / t).is_file()], pytest_args, prefix))

    mutmut = [sys.executable, "-m", "mutmut"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    names = [n for n in args.mutants.split(",") if n]
    subprocess.run(mutmut + ["run", "--max-children", str(args.max_children), *names], cwd=work, env=env, check=True)
    report = subprocess.run(mutmut + ["results", "--all", "true"], cwd=work, env=env, check=True,
                            capture_output=True, text=True).stdout
    status = dict(re.findall(r"^\s+(\S+): (.+)$", report, re.M))
    counts = Counter(status.values())
    print(f"\n{args.target}: {len(status)} mutants, {dict(counts)}")
    for name, s in sorted(status.items()):
        if s != "killed":
            print(f"  {s:12} {name}")
    if status:
        print(f"score {counts['killed'] / len(status):.1%} (killed / all; diffs: cd {work} && mutmut show NAME)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
