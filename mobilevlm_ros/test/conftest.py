"""Shared fixtures: a real sentencepiece tokenizer trained at fixture time, tiny official-format checkpoints, and one
rclpy context for the ROS tests."""

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Fuzzing budgets: "ci" (the default, what `make test` runs) stays within a few minutes on 2 cores; `make reliability`
# passes --hypothesis-profile=reliability for the long run. Every example talks to a real node, so no deadline; no
# example database either (it would write .hypothesis/ into the work tree): a failure prints its example.
_FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, **_FUZZ)
settings.register_profile("reliability", max_examples=400, **_FUZZ)
settings.load_profile("ci")

# Where the figures tests measure go (reliability counts and latencies, demo model accuracies), also printed at the end.
FIGURES_FILE = Path(os.environ.get("MOBILEVLM_FIGURES", Path(tempfile.gettempdir()) / "mobilevlm-figures.json"))
_figures: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real-size models (tens of seconds); CI runs them too, `-m 'not slow'` skips them")
    config.addinivalue_line("markers", "reliability: hostile inputs, overload, soak, faults, security (`make reliability` runs only these)")


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    """Measurements tests report (name -> JSON value): printed in the terminal summary and written to FIGURES_FILE."""
    return _figures


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In an xdist worker: hand the figures to the controlling process, which prints them."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["figures"] = json.dumps(_figures)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """In the controlling process: collect a finished worker's figures (a crashed worker's are lost with it)."""
    _figures.update(json.loads(getattr(node, "workeroutput", {}).get("figures", "{}")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _figures:
        return
    FIGURES_FILE.write_text(json.dumps(_figures, indent=2, sort_keys=True))
    terminalreporter.section("figures")
    for name, value in sorted(_figures.items()):
        terminalreporter.line(f"{name}: {json.dumps(value)}")
    terminalreporter.line(f"(written to {FIGURES_FILE})")


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_checkpoint import train_tokenizer  # imports torch and transformers: only for the tests that need them

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_model: Path) -> Callable[..., Path]:
    """Write (once per distinct arguments) a tiny checkpoint; see tiny_checkpoint.write_checkpoint for the arguments."""
    from tiny_checkpoint import write_checkpoint

    written: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items(), key=lambda item: item[0]))
        if key not in written:
            written[key] = write_checkpoint(tmp_path_factory.mktemp("checkpoint"), tokenizer_model, **kwargs)
        return written[key]

    return make


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """The tiny fp32 checkpoint most tests use."""
    import torch

    return make_checkpoint(dtype=torch.float32)


@pytest.fixture(scope="module")
def vlm(checkpoint: Path) -> Any:
    """`MobileVLM` on the tiny fp32 checkpoint, on the CPU; one per test module (tests may patch it)."""
    from mobilevlm_ros.runtime.vlm import MobileVLM

    return MobileVLM.from_pretrained(checkpoint, device="cpu")


@pytest.fixture
def copy_checkpoint(tmp_path: Path, make_checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """A private copy of a tiny checkpoint that a test may damage."""

    def copy(**kwargs) -> Path:
        return Path(shutil.copytree(make_checkpoint(**kwargs), tmp_path / "checkpoint"))

    return copy


@pytest.fixture
def camera_image() -> np.ndarray:
    """A non-square RGB frame with structure (so different images give different features)."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    image[60:180, 100:220] = (200, 30, 30)
    return image


@pytest.fixture(scope="session")
def ros_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A private rclpy context on loopback, with its own domain id and log directory (see ros_env.py)."""
    import rclpy
    from rclpy.context import Context

    from ros_env import configure_ros_test_environment

    configure_ros_test_environment(tmp_path_factory.mktemp("ros"))
    context = Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()
