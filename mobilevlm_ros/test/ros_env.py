"""Environment that keeps ROS 2 tests hermetic: call before `rclpy.init()`.

Why each variable:
- ROS_LOG_DIR: rcl writes log files under ~/.ros/log otherwise (outside the test's temp dir).
- ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST: DDS discovery stays on loopback, never the LAN.
- ROS_DOMAIN_ID: a per-run id, so a concurrent test run or a live robot on the default domain 0
  never sees this run's nodes (and vice versa).
"""

from __future__ import annotations

import os
from pathlib import Path

# Domain ids 1..101 are valid on every OS for DDS port mapping; 0 (the default) is avoided.
_FIRST_DOMAIN_ID = 1
_DOMAIN_ID_COUNT = 101


def ros_test_domain_id(pid: int | None = None) -> int:
    """Domain id for this test process, derived from its pid."""
    pid = os.getpid() if pid is None else pid
    return _FIRST_DOMAIN_ID + pid % _DOMAIN_ID_COUNT


def configure_ros_test_environment(tmp_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Set the ROS 2 environment for tests and return the variables that were set.

    Idempotent within one process (same pid, same domain). ROS reads these at `rclpy.init()`
    and node creation, so call this before either; rcl configures logging once per process,
    so the log dir of the first `rclpy.init()` is the one that is used.
    """
    log_dir = Path(tmp_dir) / "ros_log"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "ROS_LOG_DIR": str(log_dir),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_DOMAIN_ID": str(ros_test_domain_id()),
    }
    os.environ.update(env)
    return env
