"""One table of choices: the library, the command line and the node accept and refuse the same combinations."""

import subprocess
import sys
from pathlib import Path

import pytest
from rclpy.lifecycle import TransitionCallbackReturn

from mobilevlm_ros.choices import VISION_PRECISIONS, vision_precision
from mobilevlm_ros.errors import ConfigError
from mobilevlm_ros.runtime.vlm import MobileVLM
from ros_harness import Harness, node_parameters

MOBILEVLM = Path(sys.executable).parent / "mobilevlm"
REFUSED = "vision backend onnxruntime runs fp32 or int8, not 'fp16'"


def test_auto_is_each_backends_first_precision():
    assert [vision_precision(backend) for backend in VISION_PRECISIONS] == [None, "fp32", "fp16", "fp16"]
    assert vision_precision("onnxruntime", "int8") == "int8" and vision_precision("tensorrt", "fp32") == "fp32"
    with pytest.raises(ConfigError, match="vision backend torch runs in the model's dtype"):
        vision_precision("torch", "fp16")
    with pytest.raises(ConfigError, match=r"unknown vision backend 'openvino' \(expected torch, onnxruntime, tensorrt, ggml\)"):
        vision_precision("openvino")


def test_the_library_refuses_a_combination_before_loading_anything(tmp_path):
    with pytest.raises(ConfigError, match=REFUSED):
        MobileVLM.from_pretrained(tmp_path / "not-even-there", vision="onnxruntime", vision_precision="fp16")
    with pytest.raises(ConfigError, match=r"unknown language backend 'vllm' \(expected torch, llamacpp\)"):
        MobileVLM.from_pretrained(tmp_path, language="vllm")


@pytest.mark.parametrize("command", [["ask", "--image", "frame.png", "Why?"], ["build"]])
def test_the_command_line_refuses_the_same_combination(make_checkpoint, command):
    vision = ["--vision", "onnxruntime" if command[0] == "ask" else "onnx", "--precision", "fp16"]
    result = subprocess.run([str(MOBILEVLM), command[0], "--model", str(make_checkpoint()), *vision, *command[1:]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and REFUSED in result.stderr, result.stderr


def test_the_node_refuses_the_same_combination_at_configure(ros_context, make_checkpoint):
    parameters = node_parameters(make_checkpoint(), vision_backend="onnxruntime", vision_precision="fp16")
    with Harness(ros_context, parameters, "refused_precision") as h:
        assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert REFUSED in h.node.configure_error


def test_the_node_runs_the_int8_vision_graph(ros_context, make_checkpoint, tmp_path):
    """The node takes every precision the table allows: onnxruntime int8 was the CLI's only."""
    parameters = node_parameters(make_checkpoint(), vision_backend="onnxruntime", vision_precision="int8", engines_dir=str(tmp_path))
    with Harness(ros_context, parameters, "int8_vision") as h:
        assert h.node.trigger_configure() == TransitionCallbackReturn.SUCCESS, h.node.configure_error
        assert h.node.vlm.vision.name == "onnxruntime" and "int8" in h.node.vlm.vision.path.name
