"""Artifacts built ahead: the engine build policy (never / if_missing / always), the artifact path override, the
`mobilevlm build` command a missing artifact names (run here as it is printed), and artifacts resolved before any
weights load (so a build never shares memory with the loaded LLM, and "never" fails at once)."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilevlm_ros import cli
from mobilevlm_ros.choices import ENGINE_BUILD, engine_build_policy
from mobilevlm_ros.errors import ArtifactError, ConfigError
from mobilevlm_ros.export.artifacts import ArtifactKey, build_command, get_or_build
from mobilevlm_ros.model.checkpoint import is_vision_key, load_checkpoint
from mobilevlm_ros.runtime import backends
from mobilevlm_ros.runtime.vlm import MobileVLM

KEY = ArtifactKey(model_hash="ab" * 32, component="vision", precision="trt-fp16", runtime="tensorrt", runtime_version="10.3.0",
                  device="cuda:Orin sm_87 8 SMs 7 GiB", suffix="engine")
IMAGE = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)


class Builder:
    def __init__(self, content: bytes = b"engine"):
        self.content, self.calls = content, 0

    def __call__(self, path: Path) -> dict:
        self.calls += 1
        path.write_bytes(self.content + b"%d" % self.calls)
        return {}


def test_policies_and_their_older_spellings():
    assert ENGINE_BUILD == ("never", "if_missing", "always")
    assert [engine_build_policy(value) for value in (True, False, "never", "if_missing", "always")] == [
        "if_missing", "never", "never", "if_missing", "always"]
    with pytest.raises(ConfigError, match=r"unknown engine build policy 'sometimes' \(expected never, if_missing, always\)"):
        engine_build_policy("sometimes")


def test_never_names_the_command_always_rebuilds_and_a_path_holds_the_artifact(tmp_path):
    command = build_command(tmp_path / "model", ["--vision", "tensorrt", "--precision", "fp16"], tmp_path / "engines")
    with pytest.raises(ArtifactError, match=r"not built yet, and building is disabled \(engine build policy never\): build it "
                                            r"first with `mobilevlm build --model .*/model --vision tensorrt --precision fp16 "
                                            r"--engines-dir .*/engines`"):
        get_or_build(KEY, Builder(), tmp_path / "engines", "never", command=command)
    builder = Builder()
    first = get_or_build(KEY, builder, tmp_path / "engines", "if_missing")
    assert first.built and not get_or_build(KEY, builder, tmp_path / "engines", "if_missing").built and builder.calls == 1
    again = get_or_build(KEY, builder, tmp_path / "engines", "always")
    assert again.built and builder.calls == 2 and again.path == first.path and again.path.read_bytes() == b"engine2"

    chosen = tmp_path / "robot" / "vision.engine"
    placed = get_or_build(KEY, builder, tmp_path / "engines", "if_missing", path=chosen)
    assert placed.built and placed.path == chosen and (chosen.parent / "vision.engine.json").is_file()
    assert not get_or_build(KEY, Builder(), None, "never", path=chosen).built  # found at the path, whatever the cache
    stale = KEY.__class__(**{**KEY.__dict__, "runtime_version": "10.4.0"})
    with pytest.raises(ArtifactError, match=r"vision.engine: built for different inputs: runtime_version '10.3.0' \(need '10.4.0'\)"):
        get_or_build(stale, Builder(), None, "never", path=chosen)


def test_the_command_names_an_engine_path_and_absolute_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = build_command("model dir", ["--mmproj", "--mmproj-type", "f16"], "engines", "out/mmproj.gguf")
    assert shlex.split(command) == ["mobilevlm", "build", "--model", str(tmp_path / "model dir"), "--mmproj", "--mmproj-type", "f16",
                                    "--engines-dir", str(tmp_path / "engines"), "--engine-path", str(tmp_path / "out" / "mmproj.gguf")]


def run_command(command: str) -> None:
    """Run a `mobilevlm ...` line as printed, through the CLI's entry point."""
    words = shlex.split(command)
    assert words[:2] == ["mobilevlm", "build"]
    assert cli.main(words[1:]) == 0


def test_a_missing_artifact_fails_before_any_weights_load_and_its_command_builds_it(make_checkpoint, tmp_path, monkeypatch):
    checkpoint = make_checkpoint(dtype=torch.float32)
    engines = tmp_path / "engines"
    real_load = backends.load_checkpoint
    loads = []
    monkeypatch.setattr(backends, "load_checkpoint", lambda *args, **kwargs: loads.append(kwargs) or real_load(*args, **kwargs))
    with pytest.raises(ArtifactError, match="building is disabled") as error:
        MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", engines_dir=engines, build="never")
    assert loads == []  # nothing was loaded for a start that cannot succeed
    command = str(error.value).split("build it first with `")[1].split("`")[0]
    assert f"--vision onnx --precision fp32 --engines-dir {engines.resolve()}" in command
    run_command(command)
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", engines_dir=engines, build="never")
    assert vlm.vision.name == "onnxruntime" and loads[-1]["with_vision"] is False
    expected = MobileVLM.from_pretrained(checkpoint, device="cpu").ask(IMAGE, "What is here?", max_new_tokens=4)
    assert vlm.ask(IMAGE, "What is here?", max_new_tokens=4) == expected


def test_under_never_one_error_names_every_missing_artifact(make_checkpoint, tmp_path):
    pytest.importorskip("llama_cpp")
    checkpoint = make_checkpoint(dtype=torch.float32)
    with pytest.raises(ArtifactError) as error:
        MobileVLM.from_pretrained(checkpoint, device="cpu", language="llamacpp", quant="q8_0", vision="onnxruntime",
                                  engines_dir=tmp_path, build="never")
    message = str(error.value)
    assert "--llm gguf --quant q8_0" in message and "--vision onnx --precision fp32" in message


def test_an_engine_path_is_where_the_node_reads_the_artifact(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint(dtype=torch.float32)
    graph = tmp_path / "robot" / "vision-int8.onnx"
    assert cli.main(["build", "--model", str(checkpoint), "--vision", "onnx", "--precision", "int8",
                     "--engines-dir", str(tmp_path / "engines"), "--engine-path", str(graph)]) == 0
    assert graph.is_file() and json.loads((tmp_path / "robot" / "vision-int8.onnx.json").read_text())["precision"].startswith("onnx-int8")
    vlm = MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", vision_precision="int8",
                                    engines_dir=tmp_path / "elsewhere", build="never", engine_path=graph)
    assert vlm.vision.path == graph
    with pytest.raises(ArtifactError, match="elsewhere"):  # without the path, the (empty) cache is where it looks
        MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", vision_precision="int8",
                                  engines_dir=tmp_path / "elsewhere", build="never")
    with pytest.raises(ConfigError, match="the torch vision backend has none"):
        MobileVLM.from_pretrained(checkpoint, device="cpu", engine_path=graph)

def test_an_engine_path_names_one_artifact(capsys):
    for flags in (["--llm", "gguf", "--vision", "onnx"], ["--vision", "onnx", "--mmproj"]):
        assert cli.main(["build", "--model", "m", *flags, "--engine-path", "x"]) == 1
        assert "--engine-path names one file" in capsys.readouterr().err


def test_if_missing_builds_before_the_language_model_loads_and_always_rebuilds(make_checkpoint, tmp_path, monkeypatch):
    checkpoint = make_checkpoint(dtype=torch.float32)
    events = []
    real_load, real_export = backends.load_checkpoint, __import__("mobilevlm_ros.export.onnx", fromlist=["x"]).export_onnx
    monkeypatch.setattr(backends, "load_checkpoint", lambda *a, **k: events.append("load") or real_load(*a, **k))
    monkeypatch.setattr("mobilevlm_ros.export.onnx.export_onnx", lambda *a, **k: events.append("export") or real_export(*a, **k))
    MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", engines_dir=tmp_path)
    assert events == ["export", "load"]
    MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", engines_dir=tmp_path)
    assert events == ["export", "load", "load"]  # cached
    MobileVLM.from_pretrained(checkpoint, device="cpu", vision="onnxruntime", engines_dir=tmp_path, build="always")
    assert events == ["export", "load", "load", "export", "load"]


def test_a_compiled_vision_backend_leaves_the_torch_vision_weights_unread(make_checkpoint):
    checkpoint = load_checkpoint(make_checkpoint(dtype=torch.float32), with_vision=False)
    model = checkpoint.model
    assert not hasattr(model.model, "vision_tower") and not hasattr(model.model, "mm_projector")
    assert not [name for name, _ in model.named_parameters() if is_vision_key(name)]
    assert not any(tensor.is_meta for tensor in model.state_dict().values())
    assert checkpoint.image_processor.crop_size == 336
    nothing = load_checkpoint(make_checkpoint(dtype=torch.float32), with_language_model=False, with_vision=False)
    assert all(tensor.is_meta for tensor in nothing.model.state_dict().values()) and nothing.tokenizer is not None
