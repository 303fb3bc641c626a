"""The artifact cache: hits, a rebuild for every stale field or damaged file, disabled builds, concurrent builders."""

import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from mobilevlm_ros.errors import ArtifactError
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
