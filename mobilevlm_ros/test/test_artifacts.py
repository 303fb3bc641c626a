"""The artifact cache: hits, a rebuild for every stale field or damaged file, disabled builds, concurrent builders."""

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mobilevlm_ros.errors import ArtifactError
from mobilevlm_ros.export import artifacts
from mobilevlm_ros.export.artifacts import ArtifactKey, get_or_build, model_fingerprint

KEY = ArtifactKey(
    model_hash="ab" * 32, component="llm", precision="gguf-q8_0", runtime="llama-cpp-python", runtime_version="0.3.36",
    device="any", suffix="gguf", extra={"shapes": [[1, 3, 336, 336]]},
)


class Builder:
    """A build function that writes `content` and counts its calls."""

    def __init__(self, content: bytes = b"artifact bytes"):
        self.content = content
        self.calls = 0

    def __call__(self, path: Path) -> dict:
        self.calls += 1
        path.write_bytes(self.content)
        return {"calls": self.calls}


def test_first_call_builds_then_hits(tmp_path):
    builder = Builder()
    first = get_or_build(KEY, builder, tmp_path)
    assert first.built and first.path == tmp_path / KEY.filename and first.path.read_bytes() == b"artifact bytes"
    manifest = json.loads((tmp_path / (KEY.filename + ".json")).read_text())
    assert manifest == first.manifest
    assert {k: manifest[k] for k in ("component", "precision", "runtime", "runtime_version", "device", "model_hash")} == {
        "component": "llm", "precision": "gguf-q8_0", "runtime": "llama-cpp-python", "runtime_version": "0.3.36",
        "device": "any", "model_hash": "ab" * 32,
    }
    assert manifest["extra"] == {"shapes": [[1, 3, 336, 336]]}
    assert manifest["size"] == len(b"artifact bytes") and len(manifest["sha256"]) == 64
    assert manifest["build_seconds"] >= 0 and manifest["built_at"] and manifest["details"] == {"calls": 1}
    second = get_or_build(KEY, builder, tmp_path)
    assert not second.built and second.manifest == manifest and builder.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([KEY.filename, KEY.filename + ".json", KEY.filename + ".lock"])


@pytest.mark.parametrize("field, value", [
    ("model_hash", "cd" * 32), ("component", "vision"), ("precision", "gguf-q4_k_s"), ("runtime", "tensorrt"),
    ("runtime_version", "0.3.37"), ("device", "cuda:NVIDIA Orin sm_87"), ("suffix", "engine"),
    ("extra", {"shapes": [[2, 3, 336, 336]]}),
])
def test_any_changed_field_is_a_miss(tmp_path, field, value):
    get_or_build(KEY, Builder(), tmp_path)
    changed = dataclasses.replace(KEY, **{field: value})
    builder = Builder(b"rebuilt")
    artifact = get_or_build(changed, builder, tmp_path)
    assert artifact.built and builder.calls == 1 and artifact.path.read_bytes() == b"rebuilt"
    assert artifact.manifest[field] == json.loads(json.dumps(value))
    assert not get_or_build(changed, builder, tmp_path).built


@pytest.mark.parametrize("field, value", [("runtime", "tensorrt"), ("runtime_version", "0.3.37"), ("device", "cpu"), ("extra", {})])
def test_a_stale_artifact_with_building_disabled_names_the_difference(tmp_path, field, value):
    get_or_build(KEY, Builder(), tmp_path)
    with pytest.raises(ArtifactError, match=rf"{KEY.filename}: built for different inputs: {field} .* \(need .*building is disabled"):
        get_or_build(dataclasses.replace(KEY, **{field: value}), Builder(), tmp_path, build=False)


def test_building_disabled_and_nothing_built(tmp_path):
    with pytest.raises(ArtifactError, match="not built yet, and building is disabled"):
        get_or_build(KEY, Builder(), tmp_path, build=False)
    assert not (tmp_path / KEY.filename).exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(path.read_bytes()[:5]), "truncated"),
    (lambda path: path.write_bytes(b"X" + path.read_bytes()[1:]), "corrupt"),
    (lambda path: path.unlink(), "missing"),
    (lambda path: path.with_name(path.name + ".json").write_text("{not json"), "manifest is unreadable"),
    (lambda path: path.with_name(path.name + ".json").unlink(), "not built yet"),
])
def test_damaged_artifacts_are_rebuilt(tmp_path, damage, problem):
    get_or_build(KEY, Builder(), tmp_path)
    damage(tmp_path / KEY.filename)
    with pytest.raises(ArtifactError, match=problem):
        get_or_build(KEY, Builder(), tmp_path, build=False)
    builder = Builder()
    artifact = get_or_build(KEY, builder, tmp_path)
    assert artifact.built and builder.calls == 1 and artifact.path.read_bytes() == b"artifact bytes"
    assert not get_or_build(KEY, builder, tmp_path, build=False).built


def test_a_failed_build_leaves_no_artifact(tmp_path):
    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        get_or_build(KEY, fail, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY.filename + ".lock"]
    with pytest.raises(ArtifactError, match="produced no file"):
        get_or_build(KEY, lambda path: None, tmp_path)
    assert get_or_build(KEY, Builder(), tmp_path).built


def _slow_build(path: Path, log: str) -> dict:
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    with path.open("wb") as handle:
        for _ in range(5):  # slow enough for the other process to arrive while this one builds
            handle.write(b"x" * 100_000)
            handle.flush()
            time.sleep(0.1)
    return {}


def _build_in_child(engines: str, log: str, results: "multiprocessing.Queue") -> None:
    artifact = get_or_build(KEY, lambda path: _slow_build(path, log), engines)
    results.put((artifact.built, artifact.manifest["sha256"]))


def test_two_processes_building_at_once_make_one_valid_artifact(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    log = tmp_path / "builds.log"
    children = [context.Process(target=_build_in_child, args=(str(tmp_path / "engines"), str(log), results)) for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(log.read_text().split()) == 1  # one build; the other process waited and took the result
    assert sorted(built for built, _ in outcomes) == [False, True]
    assert len({sha for _, sha in outcomes}) == 1
    artifact = get_or_build(KEY, Builder(), tmp_path / "engines", build=False)
    assert artifact.path.stat().st_size == 500_000
    assert not list((tmp_path / "engines").glob(".*.tmp"))


def test_model_fingerprint_follows_the_model_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = model_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("not a model file")
    (tmp_path / "engines").mkdir()
    assert model_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert model_fingerprint(tmp_path) != first
    with pytest.raises(ArtifactError, match="no model files"):
        model_fingerprint(tmp_path / "engines")


@pytest.fixture
def sampled(monkeypatch):
    """Fingerprints that sample every weight file, with small samples close together (so a test file of 1 MB has
    unsampled stretches), and no per-process cache between the steps of a test."""
    monkeypatch.setattr(artifacts, "WHOLE_FILE_LIMIT", 0)
    monkeypatch.setattr(artifacts, "SAMPLE_BYTES", 1024)
    monkeypatch.setattr(artifacts, "SAMPLE_STRIDE", 64 << 10)
    artifacts._content_digest.cache_clear()
    yield
    artifacts._content_digest.cache_clear()


def small_model(directory: Path, fmt: str = "safetensors") -> Path:
    """config.json and a weight file: a 1 MB tensor (`big`) and a small one, like a checkpoint's layout."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"hidden_size": 64}')
    weights = {"big": torch.arange(256 * 1024, dtype=torch.float32).reshape(512, 512), "small": torch.ones(16)}
    if fmt == "safetensors":
        save_file(weights, directory / "model.safetensors")
    else:
        torch.save(weights, directory / "pytorch_model.bin")
    return directory


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def big_tensor_offset(path: Path) -> int:
    """Where the `big` tensor's bytes start in the file (found by its content, not by the code under test)."""
    start = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    offset = path.read_bytes().find(start)
    assert offset > 0
    return offset


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_the_fingerprint_survives_a_plain_copy_and_a_touch(tmp_path, sampled, fmt):
    model = small_model(tmp_path / "model", fmt)
    first = model_fingerprint(model)
    copied = Path(shutil.copytree(model, tmp_path / "elsewhere" / "copy", copy_function=shutil.copy))  # no `cp -p`
    assert model_fingerprint(copied) == first
    for path in model.iterdir():
        os.utime(path, ns=(1, 1))
    assert model_fingerprint(model) == first


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_the_fingerprint_changes_with_a_sampled_byte(tmp_path, sampled, fmt):
    model = small_model(tmp_path / "model", fmt)
    weights = next(model.glob("*.safetensors"), None) or model / "pytorch_model.bin"
    first = model_fingerprint(model)
    start, length = big_tensor_offset(weights), 512 * 512 * 4
    # The tensor's first and last bytes, and one at a stride inside it, are sampled: each changes the fingerprint.
    for offset in (start, start + length - 1, start + 64 * 1024 + 10):
        flip(weights, offset)
        assert model_fingerprint(model) != first, offset
        flip(weights, offset)
        assert model_fingerprint(model) == first
    # A byte between two samples inside one tensor is not read: that edit keeps the fingerprint (module docstring).
    flip(weights, start + 32 * 1024)
    assert model_fingerprint(model) == first


def test_the_fingerprint_reads_the_index_whole_and_small_files_whole(tmp_path, sampled):
    model = small_model(tmp_path / "model")
    first = model_fingerprint(model)
    weights = model / "model.safetensors"
    flip(weights, 20)  # inside the safetensors header
    assert model_fingerprint(model) != first
    flip(weights, 20)
    artifacts.WHOLE_FILE_LIMIT = 1 << 30  # not sampled: every byte counts
    whole = model_fingerprint(model)
    flip(weights, big_tensor_offset(weights) + 32 * 1024)
    assert model_fingerprint(model) != whole


def test_the_fingerprint_covers_names_and_subdirectories_but_not_hidden_ones(tmp_path, sampled):
    model = small_model(tmp_path / "model")
    (model / "clip").mkdir()
    (model / "clip" / "config.json").write_text('{"image_size": 336}')
    first = model_fingerprint(model)
    (model / "clip" / "config.json").write_text('{"image_size": 224}')  # a v1 model's tower directory
    assert model_fingerprint(model) != first
    (model / "clip" / "config.json").write_text('{"image_size": 336}')
    (model / ".cache").mkdir()
    (model / ".cache" / "config.json").write_text("{}")
    assert model_fingerprint(model) == first
    (model / "model.safetensors").rename(model / "other.safetensors")
    assert model_fingerprint(model) != first


def test_the_fingerprint_of_a_real_size_checkpoint_is_fast(tmp_path, figures):
    """The bench's 1.7B random checkpoint, when this machine has it: how long a fingerprint takes (page cache warm)."""
    checkpoint = Path.home() / ".cache" / "mobilevlm_ros" / "bench" / "1.7b-random-v1"
    if not (checkpoint / "model.safetensors").is_file():
        pytest.skip(f"no 1.7B checkpoint at {checkpoint} (mobilevlm bench --size 1.7b writes it)")
    artifacts._content_digest.cache_clear()
    model_fingerprint(checkpoint)
    artifacts._content_digest.cache_clear()
    started = time.perf_counter()
    model_fingerprint(checkpoint)
    figures["fingerprint_1.7b_seconds"] = round(time.perf_counter() - started, 3)
