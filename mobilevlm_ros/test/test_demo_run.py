"""`mobilevlm demo` (library only) and `make demo`'s program (three ROS nodes in one process) run on the shipped model."""

import subprocess
import sys

import pytest

from mobilevlm_ros.cli import main

KINDS = 6  # five question kinds and navigation, one question each with --per-kind 1


def test_mobilevlm_demo_prints_every_answer_and_saves_the_frames(tmp_path, capsys):
    assert main(["demo", "--per-kind", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| kind")]
    assert len(rows) == KINDS
    assert f"/{KINDS} right" in printed
    assert len(list(tmp_path.glob("*.png"))) == KINDS


@pytest.mark.slow
def test_make_demo_runs_the_node_camera_and_client_and_exits_0(ros_context, tmp_path):
    """`ros_context` sets the hermetic ROS environment (loopback, own domain id) that the process inherits."""
    done = subprocess.run([sys.executable, "-m", "mobilevlm_ros.demo.ros_demo", "--per-kind", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["kind", "question", "answer"] and len(lines) == 1 + KINDS + 1
    assert "error:" not in done.stdout
    assert len(list(tmp_path.glob("*.png"))) == KINDS  # one ~/debug_image per answer
