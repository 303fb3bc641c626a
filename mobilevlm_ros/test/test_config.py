"""config.json validation: every error names the file and the field."""

import json
import sys

import pytest

from mobilevlm_ros.errors import ConfigError
from mobilevlm_ros.model.checkpoint import load_checkpoint
from mobilevlm_ros.model.config import load_config
from tiny_checkpoint import official_config


def write(tmp_path, **changes):
    fields = official_config("ldpnetv2", 320, "clip-vit-tiny")
    for key, value in changes.items():
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return tmp_path


def test_official_fields_parse(tmp_path):
    config = load_config(write(tmp_path))
    assert (config.mm_projector_type, config.mm_hidden_size, config.hidden_size) == ("ldpnetv2", 32, 64)
    assert config.is_v2 and config.mm_vision_select_layer == -2 and config.context_length == 1024
    assert config.text_config.tie_word_embeddings is False


@pytest.mark.parametrize("projector, v2, depth", [
    ("ldpnet", False, None), ("ldpnetv2", True, None), ("mlp2x_gelu", False, 2), ("mlp3x_gelu", False, 3), ("linear", False, None),
])
def test_projector_types(tmp_path, projector, v2, depth):
    config = load_config(write(tmp_path, mm_projector_type=projector))
    assert (config.is_v2, config.mlp_depth) == (v2, depth)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: missing"):
        load_config(tmp_path)


def test_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_config(tmp_path)


def test_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, found list"):
        load_config(tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(mm_projector_type="qformer"), r"field 'mm_projector_type': unknown projector type 'qformer'"),
    (dict(mm_projector_type="mlpx_gelu"), r"field 'mm_projector_type': unknown projector type 'mlpx_gelu'"),
    (dict(hidden_size=None), r"field 'hidden_size': missing"),
    (dict(vocab_size=0), r"field 'vocab_size': expected a positive integer, found 0"),
    (dict(num_hidden_layers="2"), r"field 'num_hidden_layers': expected a positive integer, found '2'"),
    (dict(num_attention_heads=5), r"field 'num_attention_heads': 5 does not divide hidden_size 64"),
    (dict(mm_vision_tower=None), r"field 'mm_vision_tower': missing"),
    (dict(vision_tower_type="siglip"), r"field 'vision_tower_type': unsupported 'siglip'"),
    (dict(mm_hidden_size=None), r"field 'mm_hidden_size': expected a positive integer"),
    (dict(mm_vision_select_feature="cls"), r"field 'mm_vision_select_feature': unsupported 'cls'"),
    (dict(mm_vision_select_layer=1.5), r"field 'mm_vision_select_layer': expected an integer"),
    (dict(mm_use_im_start_end=True), r"field 'mm_use_im_start_end': true is not supported"),
])
def test_bad_fields_are_named(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=rf"{tmp_path}/config\.json: {message}"):
        load_config(write(tmp_path, **changes))


def test_remote_code_fields_are_ignored(tmp_path):
    config = load_config(write(tmp_path, auto_map={"AutoModelForCausalLM": "evil.Model"}))
    assert not hasattr(config.text_config, "auto_map")


@pytest.mark.reliability
@pytest.mark.parametrize("language", ["torch", "llamacpp"])
def test_remote_code_in_a_model_directory_is_never_run(copy_checkpoint, tmp_path, language):
    """Every config a checkpoint holds names code in its directory (`auto_map`, as trust_remote_code models do);
    loading the whole model, GGUF build included, must neither import nor execute it."""
    from mobilevlm_ros.runtime.vlm import MobileVLM

    path = copy_checkpoint()
    marker = tmp_path / "remote-code-ran"
    for module in ("modeling_evil", "tokenization_evil", "configuration_evil"):
        (path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write({module!r})\n")
    auto_map = {"AutoConfig": "configuration_evil.Config", "AutoModelForCausalLM": "modeling_evil.Model",
                "AutoTokenizer": ["tokenization_evil.Tokenizer", None]}
    for config_file in (path / "config.json", path / "tokenizer_config.json", path / "clip-vit-tiny" / "config.json"):
        fields = json.loads(config_file.read_text())
        config_file.write_text(json.dumps(fields | {"auto_map": auto_map, "trust_remote_code": True}))
    vlm = MobileVLM.from_pretrained(path, device="cpu", language=language, quant="f32", engines_dir=tmp_path / "engines")
    assert vlm.tokenizer.encode("Hi")
    assert not marker.exists()
    assert not {"modeling_evil", "tokenization_evil", "configuration_evil"} & sys.modules.keys()


def test_projector_width_must_match_the_tower(copy_checkpoint):
    path = copy_checkpoint()
    fields = json.loads((path / "config.json").read_text())
    fields["mm_hidden_size"] = 48
    (path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match=r"field 'mm_hidden_size': 48 but the vision tower is 32 wide"):
        load_checkpoint(path)


def test_select_layer_outside_the_tower(copy_checkpoint):
    path = copy_checkpoint()
    fields = json.loads((path / "config.json").read_text())
    fields["mm_vision_select_layer"] = -9
    (path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match=r"field 'mm_vision_select_layer': -9 is outside the 4 hidden states"):
        load_checkpoint(path)
