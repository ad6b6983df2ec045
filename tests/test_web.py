"""The web chart's data module under Node's built-in test runner (no browser, no npm packages)."""
import shutil
import subprocess
from pathlib import Path

import pytest

WEB_TESTS = Path(__file__).resolve().parent / "web"


def test_chart_data_module_with_node_test():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the web chart's tests run with `node --test tests/web`)")
    tests = sorted(str(p) for p in WEB_TESTS.glob("*.test.mjs"))
    assert tests, f"no *.test.mjs in {WEB_TESTS}"
    done = subprocess.run([node, "--test", *tests], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# pass 0" not in done.stdout
