"""The "v1" prompt and upstream's BOS / `<image>` splicing rule, on a real sentencepiece model."""

import json

import pytest
import sentencepiece

from mobilevlm_ros.errors import ConfigError, PromptError
from mobilevlm_ros.model.prompt import (
    IMAGE_TOKEN_INDEX,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_prompt,
    load_tokenizer,
    tokenize_with_image,
)

V1_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: <image>\nWhat is on the table? ASSISTANT:"
)


def test_v1_template_text():
    assert build_prompt("What is on the table?") == V1_PROMPT


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question(question):
    with pytest.raises(PromptError, match="question is empty"):
        build_prompt(question)


def test_ids_follow_upstreams_bos_and_splice_rule(tokenizer_model):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    before, after = V1_PROMPT.split("<image>")
    # Upstream: each chunk tokenized with BOS; the first BOS kept, the others dropped; -200 between chunks.
    expected = [sp.bos_id()] + sp.encode(before) + [IMAGE_TOKEN_INDEX] + sp.encode(after)
    ids = tokenize_with_image(V1_PROMPT, SentencePieceTokenizer(tokenizer_model))
    assert ids == expected
    assert ids.count(sp.bos_id()) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    placeholder = ids.index(IMAGE_TOKEN_INDEX)
    # LLaMA-style pieces around the placeholder: a lone "▁" before it, "▁" + "<0x0A>" after it.
    assert sp.id_to_piece(ids[placeholder - 1]) == "▁"
    assert [sp.id_to_piece(i) for i in ids[placeholder + 1 : placeholder + 3]] == ["▁", "<0x0A>"]


def test_prompt_without_image_and_with_two_images(tokenizer_model):
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    assert tokenize_with_image("USER: hi", tokenizer) == [1] + tokenizer.encode("USER: hi")
    assert tokenize_with_image("<image><image>", tokenizer) == [1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]


def test_decode_skips_special_tokens(tokenizer_model):
    tokenizer = SentencePieceTokenizer(tokenizer_model)
    ids = tokenizer.encode("Turn left.")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, 10_000]) == "Turn left."


def _write_tokenizer_json(tokenizer_model, directory):
    """The tokenizer.json transformers' own converter derives from the sentencepiece model (as for LLaMA)."""
    from transformers import LlamaTokenizer

    (directory / "spm").mkdir()
    (directory / "spm" / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    LlamaTokenizer.from_pretrained(directory / "spm", legacy=True).save_pretrained(directory / "hf")
    return directory / "hf"


def test_tokenizer_json_gives_the_same_ids(tokenizer_model, tmp_path):
    directory = _write_tokenizer_json(tokenizer_model, tmp_path)
    tokenizer = load_tokenizer(directory)
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenize_with_image(V1_PROMPT, tokenizer) == tokenize_with_image(V1_PROMPT, SentencePieceTokenizer(tokenizer_model))
    assert tokenizer.decode(tokenizer.encode("Go to the red door.") + [2]) == "Go to the red door."


def test_tokenizer_model_is_preferred(tokenizer_model, tmp_path):
    directory = _write_tokenizer_json(tokenizer_model, tmp_path)
    (directory / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    assert isinstance(load_tokenizer(directory), SentencePieceTokenizer)


def test_corrupt_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="tokenizer.model: not a sentencepiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(ConfigError, match="tokenizer.json: not a tokenizers file"):
        load_tokenizer(tmp_path)
