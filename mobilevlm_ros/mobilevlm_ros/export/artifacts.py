"""The artifact cache: built files (GGUF models, engines) under an engines directory, each with a JSON manifest saying
what it was built from and for. A file is reused only when every manifest field still matches and its bytes verify.

Layout: `<engines>/<component>-<precision>-<model hash[:16]>.<suffix>`, the manifest beside it as `<file>.json`, and
`<file>.lock`, which serialises builds across processes. A build writes a temporary file and renames it into place,
so a reader never sees a half-written artifact and two processes building at once produce one valid file.

The model hash fingerprints the checkpoint by content, not by modification times, so a model copied to the robot
(`cp` without `-p`, rsync, a container image) keeps every artifact built from it. Small files (config, tokenizer,
anything up to WHOLE_FILE_LIMIT) are hashed whole. A weight file is hashed by its name, size, its tensor index (the
safetensors header; the zip directory of a torch file) and samples of every tensor: its first and last 4 KiB and
4 KiB every 16 MiB in between (about 6 MB read for a 3.4 GB checkpoint; hashing it all would take seconds on every
start). A new fine-tune, or any retrained tensor, changes it; what it misses is an edit confined to an unsampled
stretch inside one tensor (a few rows of a large matrix). The artifact itself is verified by size and sha256 on
every use.
"""

import fcntl
import functools
import hashlib
import json
import logging
import os
import shlex
import struct
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from mobilevlm_ros.choices import engine_build_policy
from mobilevlm_ros.errors import ArtifactError

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: model hashes by content (1 used modification times)
# The files of a checkpoint directory that decide what gets built from it (weights, configs, tokenizer, the image
# preprocessing an mmproj records), at any depth.
FINGERPRINT_PATTERNS = ("config.json", "preprocessor_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                        "*.safetensors", "*.bin", "*.index.json")
WHOLE_FILE_LIMIT = 64 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 4 << 10  # each sample of a larger file's tensors
SAMPLE_STRIDE = 16 << 20  # one sample this far apart inside a tensor
# `mobilevlm_ros/engines` next to the Python package in a source checkout (it is committed, empty).
PACKAGE_ENGINES_DIR = Path(__file__).resolve().parents[2] / "engines"


@dataclass(frozen=True)
class ArtifactKey:
    """Everything an artifact depends on. A manifest that differs in any field describes a stale artifact."""

    model_hash: str
    component: str  # what part of the model: "llm", "vision"
    precision: str  # format and precision: "gguf-q4_k_s", "trt-fp16"
    runtime: str  # what builds and runs it: "llama-cpp-python", "tensorrt"
    runtime_version: str
    device: str  # "any" for a portable file; else what it was built for, e.g. "cuda:NVIDIA Orin sm_87"
    suffix: str  # file extension: "gguf", "engine"
    extra: Mapping[str, Any] = field(default_factory=dict)  # anything else that must match, e.g. input shapes (JSON values)

    @property
    def filename(self) -> str:
        return f"{self.component}-{self.precision}-{self.model_hash[:16]}.{self.suffix}"

    def fields(self) -> dict[str, Any]:
        """The compared fields as they appear in a manifest (JSON-normalised: tuples become lists)."""
        return json.loads(json.dumps(asdict(self) | {"extra": dict(self.extra)}))


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]
    built: bool  # built by this call (a cache miss)


def default_engines_dir() -> Path:
    """`<package>/engines` in a source checkout; `~/.cache/mobilevlm_ros/engines` for an installed package."""
    return PACKAGE_ENGINES_DIR if PACKAGE_ENGINES_DIR.is_dir() else Path.home() / ".cache" / "mobilevlm_ros" / "engines"


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the checkpoint's model files, found at any depth (a v1 model's CLIP directory too), by their paths
    relative to `model_dir` and their content (see the module docstring); the same wherever the directory is copied."""
    model_dir = Path(model_dir)
    files = sorted({
        path for pattern in FINGERPRINT_PATTERNS for path in model_dir.rglob(pattern)
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(model_dir).parts)
    })
    if not files:
        raise ArtifactError(f"{model_dir}: no model files to build from")
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        name = path.relative_to(model_dir).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{_content_digest(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)}\n".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _content_digest(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    """One file's content digest; cached per process while the file's size, time and inode stay (the artifact
    functions of one load each ask)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_LIMIT:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
            return "whole:" + digest.hexdigest()
        index, regions = _tensor_regions(path, handle, size)
        digest.update(index)
        for start, length in regions:
            for offset in _sample_offsets(length):
                handle.seek(start + offset)
                digest.update(handle.read(min(SAMPLE_BYTES, length - offset)))
    return "sampled:" + digest.hexdigest()


def _tensor_regions(path: Path, handle: BinaryIO, size: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The file's tensor index (bytes to hash whole) and its tensors as (offset, length) regions to sample: from the
    safetensors header, or the zip directory of a torch file; otherwise the whole file is one region."""
    if path.suffix == ".safetensors":
        header_size = int.from_bytes(handle.read(8), "little")
        if 0 < header_size <= size - 8:
            header = handle.read(header_size)
            try:
                entries = json.loads(header)
                offsets = sorted(tuple(entry["data_offsets"]) for name, entry in entries.items() if name != "__metadata__")
                return header, [(8 + header_size + begin, end - begin) for begin, end in offsets if end > begin]
            except (ValueError, KeyError, TypeError, AttributeError):
                pass  # not a header we can read: the file is sampled as a whole (loading it will say what is wrong)
    elif zipfile.is_zipfile(handle):
        try:
            with zipfile.ZipFile(handle) as archive:
                infos = archive.infolist()
                index = "\n".join(f"{info.filename} {info.CRC} {info.file_size}" for info in infos).encode()
                regions = [(_data_offset(handle, info), info.compress_size) for info in infos
                           if info.compress_type == zipfile.ZIP_STORED and info.file_size > 0]
            return index, regions
        except (zipfile.BadZipFile, OSError, ValueError):
            pass
    return b"", [(0, size)]


def _data_offset(handle: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start: after its local header (30 bytes, its name and its extra field)."""
    handle.seek(info.header_offset + 26)
    name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length


def _sample_offsets(length: int) -> list[int]:
    """Offsets of the samples in a region: its start, every SAMPLE_STRIDE, and its last SAMPLE_BYTES."""
    if length <= 2 * SAMPLE_BYTES:
        return [0]
    return sorted({*range(0, length - SAMPLE_BYTES, SAMPLE_STRIDE), length - SAMPLE_BYTES})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def get_or_build(
    key: ArtifactKey,
    build_fn: Callable[[Path], Mapping[str, Any] | None],
    engines_dir: str | Path | None = None,
    build: bool | str = True,
    path: str | Path | None = None,
    command: str | None = None,
) -> Artifact:
    """The artifact for `key`: the cached file when its manifest matches and it verifies, else `build_fn(path)` writes
    a new one (its returned mapping is recorded under the manifest's "details").

    `build` is the policy (choices.ENGINE_BUILD; True/False mean if_missing/never): with "never" a miss raises an
    ArtifactError naming what is wrong and `command`, the `mobilevlm build` line that makes the artifact (for
    deployments that must never spend minutes building at startup); "always" rebuilds even a valid one. `path` puts
    the artifact (and its manifest, `<path>.json`) at a file of the caller's choosing instead of
    `<engines_dir>/<key.filename>`; it is checked the same way."""
    policy = engine_build_policy(build)
    directory = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    path = Path(path) if path is not None else directory / key.filename
    manifest, problem = inspect(path, key)
    if problem is None and policy != "always":
        logger.debug("artifact cache hit: %s", path)
        return Artifact(path, manifest, built=False)
    if policy == "never":
        how = f"`{command}`" if command else "`mobilevlm build`"
        raise ArtifactError(f"{path}: {problem}, and building is disabled (engine build policy never): build it first with {how}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path):
        manifest, problem = inspect(path, key)  # another process may have built it while this one waited
        if problem is None and policy != "always":
            logger.info("artifact %s was built by another process", path)
            return Artifact(path, manifest, built=False)
        logger.info("building %s: %s", path, problem or "the engine build policy is always")
        return Artifact(path, _build(path, key, build_fn), built=True)


def build_command(model_dir: str | Path, what: Sequence[str], engines_dir: str | Path | None, path: str | Path | None = None) -> str:
    """The `mobilevlm build` line that makes an artifact: `what` are its flags (e.g. `--vision tensorrt --precision
    fp16`); the model, the engines directory (resolved, so the line is exact whoever runs it) and `path` are spelled out.
    In a colcon workspace the command is `ros2 run mobilevlm_ros mobilevlm build ...`."""
    engines = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    words = ["mobilevlm", "build", "--model", str(Path(model_dir).resolve()), *what, "--engines-dir", str(engines.resolve())]
    if path is not None:
        words += ["--engine-path", str(Path(path).resolve())]
    return shlex.join(words)


def inspect(path: Path, key: ArtifactKey) -> tuple[dict[str, Any], str | None]:
    """The manifest beside `path` and why the artifact cannot be used for `key` (None when it can)."""
    manifest_path = _manifest_path(path)
    if not manifest_path.is_file():
        return {}, "not built yet"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        return {}, f"its manifest is unreadable ({error})"
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        return manifest, f"manifest version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION}"
    differing = [f"{name} {manifest.get(name)!r} (need {value!r})" for name, value in key.fields().items() if manifest.get(name) != value]
    if differing:
        return manifest, "built for different inputs: " + ", ".join(differing)
    if not path.is_file():
        return manifest, "the file is missing"
    size = path.stat().st_size
    if size != manifest.get("size"):
        return manifest, f"the file is {size} bytes, its manifest says {manifest.get('size')} (truncated or overwritten)"
    if file_sha256(path) != manifest.get("sha256"):
        return manifest, "the file's sha256 differs from its manifest (corrupt)"
    return manifest, None


def _build(path: Path, key: ArtifactKey, build_fn: Callable[[Path], Mapping[str, Any] | None]) -> dict[str, Any]:
    """Build into a temporary file (under the lock), verify it, rename it into place, then write the manifest."""
    # Without a manifest, readers that do not take the lock see "not built" rather than a stale match.
    _manifest_path(path).unlink(missing_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # from a build that died; we hold the lock
        leftover.unlink()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    built_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    try:
        details = dict(build_fn(temporary) or {})
        if not temporary.is_file():
            raise ArtifactError(f"building {path} produced no file")
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            **key.fields(),
            "file": path.name,
            "size": temporary.stat().st_size,
            "sha256": file_sha256(temporary),
            "built_at": built_at,
            "build_seconds": round(time.perf_counter() - started, 3),
            "details": details,
        }
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _write_json_atomically(_manifest_path(path), manifest)
    logger.info("built %s (%.1f MB) in %.1f s", path, manifest["size"] / 1e6, manifest["build_seconds"])
    return manifest


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock per artifact, held while building; released by the OS if the process dies."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
