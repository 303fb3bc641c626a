"""`mobilevlm ask` end to end through the installed console script."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mobilevlm_ros.cpu import cpu_info
from mobilevlm_ros.ggml import offered_buffer_types
from mobilevlm_ros.runtime.vlm import MobileVLM

MOBILEVLM = Path(sys.executable).parent / "mobilevlm"


def run(*args: str) -> subprocess.CompletedProcess:
    assert MOBILEVLM.exists(), f"{MOBILEVLM} is not installed (run `make install`)"
    return subprocess.run([str(MOBILEVLM), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def image_file(tmp_path, camera_image) -> Path:
    path = tmp_path / "frame.png"
    Image.fromarray(camera_image).save(path)
    return path


def test_ask_prints_the_answer(make_checkpoint, image_file, camera_image):
    checkpoint = make_checkpoint()
    result = run("ask", "--model", str(checkpoint), "--image", str(image_file), "--max-new-tokens", "6", "What is here?")
    assert result.returncode == 0, result.stderr
    expected = MobileVLM.from_pretrained(checkpoint, device="cpu").ask(camera_image, "What is here?", max_new_tokens=6)
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("case, reason", [
    ("missing image", r"nope\.png: cannot read image"),
    ("missing model", r"no-model: not a directory"),
    ("empty question", r"question is empty"),
    ("zero tokens", r"max_new_tokens must be positive, got 0"),
    ("corrupt weights", r"model\.safetensors: unreadable or corrupt weight file"),
])
def test_bad_input_exits_nonzero_with_a_one_line_reason(copy_checkpoint, image_file, tmp_path, case, reason):
    checkpoint = copy_checkpoint()
    args = {"--model": str(checkpoint), "--image": str(image_file), "--max-new-tokens": "4"}
    question = "What is here?"
    if case == "missing image":
        args["--image"] = str(tmp_path / "nope.png")
    elif case == "missing model":
        args["--model"] = str(tmp_path / "no-model")
    elif case == "empty question":
        question = "  "
    elif case == "zero tokens":
        args["--max-new-tokens"] = "0"
    elif case == "corrupt weights":
        (checkpoint / "model.safetensors").write_bytes(b"\x00" * 64)
    result = run("ask", *[item for pair in args.items() for item in pair], question)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mobilevlm ask: error: ")
    assert re.search(reason, lines[0])


def test_doctor_lists_every_backend():
    result = run("doctor")
    assert result.returncode == 0, result.stderr
    for component in ("torch", "onnxruntime (vision)", "tensorrt (vision)", "llamacpp (language)", "ggml (vision)", "ROS 2 node"):
        assert f"| {component}" in result.stdout
    assert f"| cpu | yes | {cpu_info().describe()} |" in result.stdout
    assert f"CPU weight buffers {', '.join(offered_buffer_types())}" in result.stdout


def test_build_the_vision_graph_then_ask_with_onnxruntime(make_checkpoint, image_file, camera_image, tmp_path):
    checkpoint = make_checkpoint()
    built = run("build", "--model", str(checkpoint), "--vision", "onnx", "--engines-dir", str(tmp_path))
    assert built.returncode == 0, built.stderr
    assert "vision-onnx-opset17-" in built.stdout and "| built |" in built.stdout
    again = run("build", "--model", str(checkpoint), "--vision", "onnx", "--engines-dir", str(tmp_path))
    assert "| cached |" in again.stdout
    answer = run("ask", "--model", str(checkpoint), "--image", str(image_file), "--max-new-tokens", "5",
                 "--vision", "onnxruntime", "--engines-dir", str(tmp_path), "What is here?")
    assert answer.returncode == 0, answer.stderr
    expected = MobileVLM.from_pretrained(checkpoint, device="cpu").ask(camera_image, "What is here?", max_new_tokens=5)
    assert answer.stdout == expected + "\n"


def test_tensorrt_build_explains_why_it_cannot_run(make_checkpoint, tmp_path):
    from mobilevlm_ros.tensorrt_support import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT can run here; the engine itself is tested in test_onnx.py")
    result = run("build", "--model", str(make_checkpoint()), "--vision", "tensorrt", "--engines-dir", str(tmp_path))
    assert result.returncode == 1
    assert "cannot build a TensorRT engine here: " in result.stderr
