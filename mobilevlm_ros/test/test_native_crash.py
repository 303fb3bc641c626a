"""A native crash costs one test, not the run: the suite's own pytest configuration runs a file in which one test
dies of a segmentation fault, and the summary names that test as failed while the others pass."""

import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]

CRASHING_TESTS = '''
import ctypes


def test_before():
    pass


def test_segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV in native code


def test_after():
    pass
'''


def test_a_segfault_fails_only_the_test_that_caused_it(tmp_path):
    (tmp_path / "test_crashing.py").write_text(CRASHING_TESTS)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPOSITORY / "pyproject.toml"), "--rootdir", str(tmp_path), "-p", "no:cacheprovider",
         str(tmp_path / "test_crashing.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    assert "1 failed, 2 passed" in summary, run.stdout
    assert re.search(r"^FAILED \S*test_crashing\.py::test_segfault", run.stdout, re.MULTILINE), run.stdout
    assert "crashed while running" in run.stdout
