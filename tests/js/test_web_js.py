"""The pack's plain-ES-module JavaScript (web/) under Node's built-in test runner: every *.test.mjs
beside this file (no browser, no npm packages). Skipped without node; fails when no JS test ran."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

JS_TESTS = Path(__file__).resolve().parent


def test_web_modules_with_node_test():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the web modules' tests run with `node --test tests/js/*.test.mjs`)")
    tests = sorted(str(p) for p in JS_TESTS.glob("*.test.mjs"))
    assert tests, f"no *.test.mjs in {JS_TESTS}"
    done = subprocess.run([node, "--test", *tests], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    counts = dict(re.findall(r"^# (pass|fail) (\d+)$", done.stdout, re.M))
    assert counts.get("fail") == "0" and int(counts.get("pass", 0)) > 0, done.stdout[-4000:]
    # node 20 reports a file that ran no test as one passing test named after the file
    empty = [t for t in tests if re.search(rf"^ok \d+ - {re.escape(t)}$", done.stdout, re.M)]
    assert not empty, f"no test ran in {empty}"
