"""Where Chromium is missing the browser test is skipped, and the test run says so and how to get it (it used
to pass as one more quiet "skipped")."""
from __future__ import annotations

import os
import subprocess
import sys

from harness import ROOT

# runs the browser test with no conftest (so no shop is started) and with Chromium looked for where it is not
PLUGIN = '''
import pytest


@pytest.fixture(scope="session")
def shop():
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        item.module.CHROMIUM = "/nonexistent/chromium"
'''


def test_a_missing_chromium_is_reported_with_what_to_install(tmp_path):
    (tmp_path / "chromium_gone.py").write_text(PLUGIN)
    env = {k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_START"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.path.join(ROOT, "tests")])
    result = subprocess.run([sys.executable, "-m", "pytest", "--noconftest", "-p", "chromium_gone",
                             "-p", "no:cacheprovider", "tests/e2e/test_dashboard.py"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(summary) == 1, result.stdout
    assert "browser test of the live dashboard NOT RUN: no Chromium at /nonexistent/chromium" in summary[0]
    assert "apt-get install chromium" in summary[0]
