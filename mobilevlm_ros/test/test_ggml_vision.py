"""The ggml vision backend (llama.cpp's mtmd on an mmproj GGUF) in the library, on the command line and in the node."""

import logging
import subprocess
import sys
from pathlib import Path

import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import pytest
import torch
from PIL import Image
from rclpy.lifecycle import TransitionCallbackReturn

from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.choices import vision_precision
from mobilevlm_ros.cpu import physical_cores
from mobilevlm_ros.errors import ArtifactError, BackendError, ConfigError
from mobilevlm_ros.model.checkpoint import is_vision_key
from mobilevlm_ros.runtime.ggml_vision import CONTEXT_ATTEMPTS, GgmlVision
from mobilevlm_ros.runtime.vlm import MobileVLM
from ros_harness import FRAME, Harness, encode, node_parameters, stamp
from vision_graphs import cosine

MOBILEVLM = Path(sys.executable).parent / "mobilevlm"
QUESTION = "What colour?"


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def ggml_vlm(checkpoint, engines) -> MobileVLM:
    return MobileVLM.from_pretrained(checkpoint, device="cpu", vision="ggml", engines_dir=engines)


def test_precisions_are_f16_and_f32_mmproj_files():
    assert vision_precision("ggml") == "fp16" and vision_precision("ggml", "fp32") == "fp32"
    with pytest.raises(ConfigError, match="vision backend ggml runs fp16 or fp32, not 'int8'"):
        vision_precision("ggml", "int8")


def test_from_pretrained_runs_mtmd_and_answers_as_torch(ggml_vlm, vlm, engines):
    assert ggml_vlm.vision.name == "ggml" and ggml_vlm.vision.file_type == "f16"
    assert ggml_vlm.vision.path.parent == engines and ggml_vlm.vision.path.name.startswith("mmproj-gguf-f16-")
    assert not [name for name, _ in ggml_vlm.language.model.named_parameters() if is_vision_key(name)]  # freed
    assert ggml_vlm.vision.threads == physical_cores()
    assert cosine(ggml_vlm.encode_image(FRAME), vlm.encode_image(FRAME)) >= 0.999
    assert ggml_vlm.ask(FRAME, QUESTION, max_new_tokens=6) == vlm.ask(FRAME, QUESTION, max_new_tokens=6)


def test_tiles_go_through_as_one_batch(ggml_vlm):
    frame = np.random.default_rng(3).integers(0, 256, (400, 700, 3), dtype=np.uint8)
    views = ggml_vlm.views(frame, mode="tiles", max_tiles=2)
    batch = ggml_vlm.encode_images(views.images)
    assert batch.shape == (len(views.images), 144, 64)
    assert torch.equal(batch[1], ggml_vlm.encode_image(views.images[1])[0])


def test_pixels_go_back_to_the_8bit_squares_they_came_from(ggml_vlm, caplog):
    processor, backend = ggml_vlm.image_processor, ggml_vlm.vision
    frames = [FRAME, np.random.default_rng(4).integers(0, 256, (50, 90, 3), dtype=np.uint8)]
    squares = backend.to_squares(processor.batch(frames))
    assert np.array_equal(squares, np.stack([np.asarray(processor.square(f)) for f in frames]))
    with caplog.at_level(logging.WARNING):
        backend.to_squares(torch.zeros(1, 3, 336, 336) + 0.0123)  # not from an 8-bit image: rounded, and said once
    assert "pixel values are not 8-bit image levels" in caplog.text
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 336, 336\], got \[1, 3, 224, 224\]"):
        backend(torch.zeros(1, 3, 224, 224))


def test_nothing_reaches_stdout_or_stderr_and_a_closed_context_says_so(checkpoint, engines, capfd):
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu", vision="ggml", vision_precision="fp32", engines_dir=engines)
    vlm.encode_image(FRAME)
    vlm.vision.close()
    vlm.vision.close()  # idempotent
    with pytest.raises(BackendError, match="the mtmd context is closed"):
        vlm.encode_image(FRAME)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.fixture
def miscounted_tokens(monkeypatch) -> list[int]:
    """mtmd's token count of an image chunk, plus the extra tokens listed (one entry per count asked, then none): the
    upstream defect of an mtmd context without a text model (ggml_vision.py) made to happen when a test wants it."""
    extra: list[int] = []
    real = mtmd.mtmd_input_chunk_get_n_tokens
    monkeypatch.setattr(mtmd, "mtmd_input_chunk_get_n_tokens", lambda chunk: real(chunk) + (extra.pop(0) if extra else 0))
    return extra


def test_a_context_that_miscounts_an_images_tokens_is_opened_again(ggml_vlm, miscounted_tokens, caplog):
    miscounted_tokens.append(3)  # (nx + 1) * ny + 2 for nx * ny: HunyuanVL's layout read from uninitialized memory
    with caplog.at_level(logging.DEBUG, logger="mobilevlm_ros.runtime.ggml_vision"):
        backend = GgmlVision(ggml_vlm.vision.path)
    assert "mtmd context counts 147 tokens for an image of 144: opening another" in caplog.text
    assert torch.equal(backend(ggml_vlm.image_processor.batch([FRAME])), ggml_vlm.encode_image(FRAME))
    miscounted_tokens.append(3)
    with pytest.raises(BackendError, match="mtmd counts 147 tokens for an image of 144; not encoding it"):
        backend.encode_squares(backend.to_squares(ggml_vlm.image_processor.batch([FRAME])))
    backend.close()
    miscounted_tokens.extend([3] * CONTEXT_ATTEMPTS)
    with pytest.raises(BackendError, match=f"{CONTEXT_ATTEMPTS} mtmd contexts in a row miscounted an image's tokens"):
        GgmlVision(ggml_vlm.vision.path)


def test_unreadable_mmproj_is_a_clear_error(tmp_path):
    (tmp_path / "mmproj.gguf").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="mmproj.gguf: not a readable GGUF file"):
        GgmlVision(tmp_path / "mmproj.gguf")


def test_command_line_builds_the_mmproj_and_asks_with_ggml(checkpoint, vlm, tmp_path):
    Image.fromarray(FRAME).save(tmp_path / "frame.png")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(MOBILEVLM), *args], capture_output=True, text=True, timeout=300)

    built = run("build", "--model", str(checkpoint), "--mmproj", "--engines-dir", str(tmp_path))
    assert built.returncode == 0, built.stderr
    assert "mmproj-gguf-f16-" in built.stdout and "| built |" in built.stdout
    answer = run("ask", "--model", str(checkpoint), "--image", str(tmp_path / "frame.png"), "--max-new-tokens", "6",
                 "--vision", "ggml", "--engines-dir", str(tmp_path), QUESTION)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == vlm.ask(FRAME, QUESTION, max_new_tokens=6) + "\n"  # llama.cpp's log stays off stdout


def test_the_node_answers_with_the_ggml_backend(ros_context, checkpoint, vlm, tmp_path):
    h = Harness(ros_context, node_parameters(checkpoint, vision_backend="ggml", vision_precision="fp32", engines_dir=str(tmp_path)), "ggml")
    try:
        assert h.node.trigger_configure() == TransitionCallbackReturn.SUCCESS, h.node.configure_error
        assert h.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert h.node.vlm.vision.name == "ggml" and list(tmp_path.glob("mmproj-gguf-f32-*.gguf"))
        h.publish_frame(encode(FRAME, "rgb8", stamp(2400)))
        response = h.call(h.vqa, VisualQuery.Request(question=QUESTION))
        assert response.success, response.error
        assert response.answer == vlm.ask(FRAME, QUESTION, max_new_tokens=6)
        navigation = h.call(h.navigate, NavigationInstruction.Request(instruction="Go to the red door."))
        assert navigation.success, navigation.error
    finally:
        h.close()
