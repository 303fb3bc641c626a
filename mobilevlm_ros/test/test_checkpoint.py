"""Strict loading of official-format checkpoints: formats, dtypes, vision tower sources, and every way to get it wrong."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobilevlm_ros.errors import CheckpointError, ConfigError
from mobilevlm_ros.model.checkpoint import VISION_TOWER_PREFIX, load_checkpoint, read_weights
from tiny_checkpoint import clip_state_dict

FORMATS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("projector", ["ldpnet", "ldpnetv2"])
def test_loads_every_tensor_strictly(make_checkpoint, projector, fmt):
    path = make_checkpoint(projector_type=projector, fmt=fmt)
    files, _ = read_weights(path)
    loaded = load_checkpoint(path)
    state = loaded.model.state_dict()
    assert state.keys() == files.keys()
    projector_key = "peg.peg.0.bias" if projector == "ldpnetv2" else "model.mb_block.2.block.1.fc2.weight"
    for key in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.mm_projector." + projector_key):
        assert torch.equal(state[key], files[key].float())


def test_projector_key_count_matches_upstream(make_checkpoint):
    """Upstream's LDP v1 has 24 tensors (MobileVLM notes); v2 has 6."""
    for projector, count in (("ldpnet", 24), ("ldpnetv2", 6)):
        state = load_checkpoint(make_checkpoint(projector_type=projector)).model.state_dict()
        assert sum(key.startswith("model.mm_projector.") for key in state) == count


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_any_stored_dtype_loads_into_the_requested_dtype(make_checkpoint, dtype):
    model = load_checkpoint(make_checkpoint(dtype=dtype), dtype=torch.float32).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_v2_uses_the_tower_stored_in_the_checkpoint(make_checkpoint):
    path = make_checkpoint(projector_type="ldpnetv2")
    stored, _ = read_weights(path)
    model = load_checkpoint(path).model
    key = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(model.state_dict()[VISION_TOWER_PREFIX + key], stored[VISION_TOWER_PREFIX + key].float())


def test_v1_reloads_the_tower_from_mm_vision_tower_like_upstream(make_checkpoint, caplog):
    path = make_checkpoint(projector_type="ldpnet")
    tower = load_file(path / "clip-vit-tiny" / "model.safetensors")
    stored, _ = read_weights(path)
    key = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(tower[key], stored[VISION_TOWER_PREFIX + key].float())
    with caplog.at_level("INFO"):
        model = load_checkpoint(path).model
    assert torch.equal(model.state_dict()[VISION_TOWER_PREFIX + key], tower[key])
    assert "stored in the checkpoint is ignored" in caplog.text


def test_v1_never_reads_the_stored_tower_copy(make_checkpoint, monkeypatch):
    """The copy upstream ignores is not read at all (on CUDA it would take device memory until dropped)."""
    from mobilevlm_ros.model import checkpoint as checkpoint_module

    path = make_checkpoint(projector_type="ldpnet")
    assert any(key.startswith(VISION_TOWER_PREFIX) for key in read_weights(path)[0])  # the checkpoint stores one
    read = []
    real_read = checkpoint_module.read_weight_file

    def recording(*args, **kwargs):
        tensors = real_read(*args, **kwargs)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(checkpoint_module, "read_weight_file", recording)
    load_checkpoint(path)
    assert read and not [key for key in read if key.startswith(VISION_TOWER_PREFIX)]
    assert any(key.startswith("vision_model.") for key in read)  # from the tower directory


def test_v2_without_stored_tower_loads_it_from_the_tower_directory(make_checkpoint):
    path = make_checkpoint(projector_type="ldpnetv2", store_tower=False)
    tower = load_file(path / "clip-vit-tiny" / "model.safetensors")
    model = load_checkpoint(path).model
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(model.state_dict()[VISION_TOWER_PREFIX + key], tower[key])


def test_absolute_vision_tower_path(copy_checkpoint, tmp_path):
    path = copy_checkpoint(projector_type="ldpnet", store_tower=False)
    moved = (path / "clip-vit-tiny").rename(tmp_path / "elsewhere-clip")
    config = json.loads((path / "config.json").read_text())
    config["mm_vision_tower"] = str(moved)
    (path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(path).model.vision_path.vision_tower.config.hidden_size == 32


def test_missing_tower_everywhere_is_a_clear_error(copy_checkpoint):
    path = copy_checkpoint(projector_type="ldpnet", store_tower=False)
    (path / "clip-vit-tiny" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no vision tower weights"):
        load_checkpoint(path)


def test_unknown_tower_name_names_the_field(copy_checkpoint):
    path = copy_checkpoint(write_tower_dir=False)
    with pytest.raises(ConfigError, match=r"config.json: field 'mm_vision_tower': 'clip-vit-tiny' is neither a local directory"):
        load_checkpoint(path)


def _edit_weights(path: Path, edit) -> None:
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors")


def test_missing_key_is_named(copy_checkpoint):
    path = copy_checkpoint()
    _edit_weights(path, lambda w: w.pop("model.mm_projector.peg.peg.0.bias"))
    with pytest.raises(CheckpointError, match=r"missing: model\.mm_projector\.peg\.peg\.0\.bias"):
        load_checkpoint(path)


def test_unexpected_key_is_named_with_its_file(copy_checkpoint):
    path = copy_checkpoint()
    _edit_weights(path, lambda w: w.update({"model.mm_projector.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.mm_projector\.extra\.weight \(in model\.safetensors\)"):
        load_checkpoint(path)


def test_wrong_shape_is_named_with_both_shapes(copy_checkpoint):
    path = copy_checkpoint()
    _edit_weights(path, lambda w: w.update({"model.norm.weight": torch.ones(65, dtype=torch.float16)}))
    with pytest.raises(CheckpointError,
                       match=r"wrong shape: model\.norm\.weight \(in model\.safetensors\): \(65,\) in the file, \(64,\) expected"):
        load_checkpoint(path)


def test_all_problems_are_reported_together(copy_checkpoint):
    path = copy_checkpoint()

    def edit(weights):
        weights.pop("lm_head.weight")
        weights["bogus"] = torch.zeros(1)

    _edit_weights(path, edit)
    with pytest.raises(CheckpointError, match=r"missing: lm_head\.weight; unexpected: bogus"):
        load_checkpoint(path)


@pytest.mark.parametrize("fmt, file", [
    ("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin"), ("bin-sharded", "pytorch_model-00002-of-00002.bin"),
])
def test_truncated_weight_file(copy_checkpoint, fmt, file):
    path = copy_checkpoint(fmt=fmt)
    data = (path / file).read_bytes()
    (path / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{file}: unreadable or corrupt weight file"):
        load_checkpoint(path)


def test_shard_listed_in_the_index_but_absent(copy_checkpoint):
    path = copy_checkpoint(fmt="safetensors-sharded")
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: missing"):
        load_checkpoint(path)


def test_index_that_disagrees_with_its_shard(copy_checkpoint):
    path = copy_checkpoint(fmt="bin-sharded")
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    moved = next(key for key, file in index["weight_map"].items() if file.endswith("00001-of-00002.bin"))
    index["weight_map"][moved] = "pytorch_model-00002-of-00002.bin"
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"pytorch_model-00001-of-00002\.bin: tensors the index does not list: {moved}"):
        load_checkpoint(path)


def test_no_weights_at_all(copy_checkpoint):
    path = copy_checkpoint()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(path)


class _Payload:
    """Pickling this would call `function(*arguments)` on load if the loader were unsafe."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return (self.function, self.arguments)


def _code_payloads(marker: Path) -> list:
    import builtins
    import os
    import subprocess

    return [
        _Payload(os.system, f"touch {marker}"),
        _Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
        _Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        _Payload(subprocess.call, ["touch", str(marker)]),
        _Payload(builtins.open, str(marker), "w"),
    ]


@pytest.mark.reliability
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("payload", range(5), ids=["os.system", "exec", "eval", "subprocess.call", "open"])
def test_a_pickle_that_holds_code_is_refused(copy_checkpoint, tmp_path, writer, payload):
    """Raw pickles and torch's zip format alike: loading calls nothing the file names."""
    path = copy_checkpoint(fmt="bin")
    marker = tmp_path / "pwned"
    weights = torch.load(path / "pytorch_model.bin", weights_only=True)
    weights["model.norm.weight"] = _code_payloads(marker)[payload]
    if writer == "pickle":
        with open(path / "pytorch_model.bin", "wb") as file:
            pickle.dump(weights, file)
    else:
        torch.save(weights, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: unreadable or corrupt"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.reliability
@pytest.mark.parametrize("content", [
    {"model.norm.weight": "a string"}, {"model.norm.weight": 3}, {"model.norm.weight": [torch.ones(64)]},
    {"state_dict": {"model.norm.weight": torch.ones(64)}}, [torch.ones(64)], {1: torch.ones(64)},
], ids=["string", "int", "list", "nested", "not a mapping", "int key"])
def test_a_pickle_that_holds_anything_but_named_tensors_is_refused(copy_checkpoint, content):
    """Plain data passes weights_only unpickling; the loader still accepts nothing but a mapping of names to tensors."""
    path = copy_checkpoint(fmt="bin")
    torch.save(content, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: expected a flat mapping of names to tensors"):
        load_checkpoint(path)


def test_missing_tokenizer(copy_checkpoint):
    path = copy_checkpoint()
    (path / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_checkpoint(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_checkpoint(tmp_path / "nothing-here")


def test_clip_helper_uses_the_4x_layout():
    assert all(key.startswith("vision_model.") for key in clip_state_dict(0))


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "safetensors-sharded", "bin-sharded"])
@pytest.mark.parametrize("projector", ["ldpnetv2", "ldpnet"])
def test_vision_only_loading_skips_the_language_model(make_checkpoint, fmt, projector):
    """For a GGUF language backend: the vision part loads exactly, cast to the dtype; the LLM stays on the meta device."""
    checkpoint = make_checkpoint(fmt=fmt, projector_type=projector)
    full = load_checkpoint(checkpoint, dtype=torch.bfloat16).model.state_dict()
    vision = load_checkpoint(checkpoint, dtype=torch.bfloat16, with_language_model=False).model
    for key, tensor in vision.state_dict().items():
        if key.startswith(("model.vision_tower.", "model.mm_projector.")):
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, full[key]), key
        else:
            assert tensor.is_meta, key


PEAK_RSS_SCRIPT = """
import json, sys
import torch
import transformers.models.clip.modeling_clip, transformers.models.llama.modeling_llama  # imported before the baseline
from mobilevlm_ros.model.checkpoint import load_checkpoint

def status(field: str) -> int:
    # VmHWM, not ru_maxrss: after a fork and exec, ru_maxrss still holds the parent's peak (the pytest process's)
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

before = status("VmRSS")
model = load_checkpoint(sys.argv[1], dtype=getattr(torch, sys.argv[2])).model
peak = status("VmHWM")
size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
print(json.dumps({"before": before, "peak": peak, "model": size}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loading_holds_one_copy_of_the_weights(make_checkpoint, fmt, figures):
    """An fp16 checkpoint loaded as fp32, in a fresh process: the peak RSS grows by about the model's fp32 size, not by
    the file's tensors plus the model (1.5x) or by two fp32 copies (2x)."""
    import os
    import subprocess
    import sys

    checkpoint = make_checkpoint(hidden_size=2048, fmt=fmt)  # ~84 M parameters: 336 MB in fp32, 168 MB on disk
    package = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(checkpoint), "float32"], capture_output=True, text=True,
                            timeout=600, env=os.environ | {"PYTHONPATH": package + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (measured["peak"] - measured["before"]) / measured["model"]
    figures[f"checkpoint_load_fp32_peak_rss_growth_over_model_{fmt}"] = round(growth, 3)
    assert growth <= 1.25, measured


def test_weights_are_assigned_where_they_were_read_and_buffers_are_made_for_real(make_checkpoint, monkeypatch):
    """No copy after reading (on CUDA: read straight to the device), and the buffers that are not in the files (rotary
    inv_freq, CLIP position_ids) equal those of a model built the ordinary way."""
    from transformers.initialization import no_init_weights

    from mobilevlm_ros.model import checkpoint as checkpoint_module

    read = {}
    real_read = checkpoint_module.read_weights

    def recording(*args, **kwargs):
        tensors, sources = real_read(*args, **kwargs)
        read.update({key: tensor.data_ptr() for key, tensor in tensors.items()})
        return tensors, sources

    monkeypatch.setattr(checkpoint_module, "read_weights", recording)
    loaded = load_checkpoint(make_checkpoint(projector_type="ldpnet"), dtype=torch.bfloat16)
    model = loaded.model
    for key, parameter in model.named_parameters():
        # v1: the tower comes from the tower directory (keys without the prefix), not the copy in the checkpoint
        source = read.get(key.replace(VISION_TOWER_PREFIX, "", 1), read.get(key))
        assert parameter.data_ptr() == source and parameter.dtype == torch.bfloat16, key
    with no_init_weights():
        ordinary = type(model)(model.mobilevlm_config, model.vision_path.vision_tower.config)
    expected = dict(ordinary.named_buffers())
    buffers = dict(model.named_buffers())
    assert buffers.keys() == expected.keys() and {"model.rotary_emb.inv_freq"} <= buffers.keys()
    assert any(key.endswith("position_ids") for key in buffers)
    for key, buffer in buffers.items():
        assert not buffer.is_meta and buffer.dtype == expected[key].dtype and torch.equal(buffer, expected[key]), key
    assert not any(tensor.is_meta for tensor in model.state_dict().values())


def test_a_mapped_torch_file_leaves_no_parameter_in_the_mapping(copy_checkpoint):
    """Vision-only loading maps a torch file; parameters are copied out, so the file can be overwritten in place."""
    path = copy_checkpoint(fmt="bin", dtype=torch.float32)  # loaded as stored: no cast that would copy anyway
    model = load_checkpoint(path, with_language_model=False).model
    before = {key: tensor.clone() for key, tensor in model.vision_path.state_dict().items()}
    size = (path / "pytorch_model.bin").stat().st_size
    with open(path / "pytorch_model.bin", "r+b") as handle:
        handle.write(b"\0" * size)
    for key, tensor in model.vision_path.state_dict().items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loading to CUDA needs a CUDA GPU (none visible to torch)")
def test_loading_to_cuda_allocates_the_model_once(make_checkpoint):
    checkpoint = make_checkpoint(hidden_size=1024)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = load_checkpoint(checkpoint, dtype=torch.float16, device="cuda").model
    size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    assert all(tensor.is_cuda for tensor in model.state_dict().values())
    assert torch.cuda.max_memory_allocated() - start <= 1.1 * size + (8 << 20)
