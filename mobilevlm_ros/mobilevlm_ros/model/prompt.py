"""MobileVLM's "v1" conversation prompt and upstream's rule for splicing the image into the token ids.

Upstream tokenizes the text on each side of `<image>` separately with the slow sentencepiece tokenizer, keeps only
the first BOS, and puts the placeholder id -200 between the chunks; the model then replaces the placeholder with the
image embeddings. Reproducing the ids (not just the text) matters: with the LLaMA vocabulary a lone `▁` ends up
before the placeholder and `▁`, `<0x0A>` after it.
"""

import json
from pathlib import Path
from typing import Protocol

import sentencepiece
import tokenizers

from mobilevlm_ros.errors import ConfigError, PromptError

IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def check_question(text: str, what: str = "question") -> None:
    """Refuse an empty or blank question (or, as `what` says, instruction) before any work is done for it."""
    if not text or not text.strip():
        raise PromptError(f"{what} is empty")


def build_prompt(question: str, image_text: str = IMAGE_PLACEHOLDER) -> str:
    """The "v1" template with the image before the question, as upstream's inference script builds it
    (`image_text`: several images, see `tiled_image_text`)."""
    check_question(question)
    return f"{SYSTEM_PROMPT} USER: {image_text}\n{question} ASSISTANT:"


def tiled_image_text(cols: int, rows: int) -> str:
    """An overview and a cols x rows grid of tiles, as MiniCPM-V lays them out with text for its slice tokens: the
    overview, then the tiles row by row, a space between the tiles of a row and "\n" between rows. A 1x1 grid is
    the overview alone. MobileVLM was trained on one image per prompt, so this layout is new to it."""
    if (cols, rows) == (1, 1):
        return IMAGE_PLACEHOLDER
    row = " ".join([IMAGE_PLACEHOLDER] * cols)
    return IMAGE_PLACEHOLDER + "\n" + "\n".join([row] * rows)


class Tokenizer(Protocol):
    """What the runtime needs from a tokenizer: ids without special tokens added, and text back."""

    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """LLaMA's `tokenizer.model`, used the way transformers' slow (legacy) LlamaTokenizer uses it."""

    def __init__(self, path: Path):
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ConfigError(f"{path}: not a sentencepiece model ({error})") from error
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self._vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, skipping control and unknown tokens and ids past the tokenizer (as skip_special_tokens does)."""
        kept = [i for i in ids if 0 <= i < self._vocab_size and not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        return self.sp.decode(kept)


class HuggingFaceTokenizer:
    """A `tokenizer.json` (tokenizers library), for checkpoints that ship no sentencepiece model."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ConfigError(f"{path}: not a tokenizers file ({error})") from error
        special = _special_tokens(path.parent)
        self.bos_id = self._token_id(special.get("bos_token", "<s>"))
        self.eos_id = self._token_id(special.get("eos_token", "</s>"))

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)


def _special_tokens(model_dir: Path) -> dict[str, str]:
    """bos/eos token strings from tokenizer_config.json (plain strings or {"content": ...} objects)."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error
    tokens = {}
    for name in ("bos_token", "eos_token"):
        value = fields.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """`tokenizer.model` when present (upstream uses the slow tokenizer), else `tokenizer.json`."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        return SentencePieceTokenizer(model_dir / "tokenizer.model")
    if (model_dir / "tokenizer.json").is_file():
        return HuggingFaceTokenizer(model_dir / "tokenizer.json")
    raise ConfigError(f"{model_dir}: no tokenizer (expected tokenizer.model or tokenizer.json)")


def prefix_ids(tokenizer: Tokenizer) -> list[int]:
    """[BOS] + "{system} USER: ": the "v1" prompt before the image, the same for every question."""
    return [tokenizer.bos_id] + tokenizer.encode(f"{SYSTEM_PROMPT} USER: ")


def image_prefix_ids(tokenizer: Tokenizer, image_text: str = IMAGE_PLACEHOLDER) -> list[int]:
    """`prefix_ids` followed by the image part (IMAGE_TOKEN_INDEX for each image, separators tokenized between
    them as upstream tokenizes the chunks around `<image>`): everything before the question."""
    ids = tokenize_with_image(f"{SYSTEM_PROMPT} USER: {image_text}", tokenizer)
    if ids[-1] != IMAGE_TOKEN_INDEX:
        raise PromptError(f"image text must end with {IMAGE_PLACEHOLDER}: {image_text!r}")
    return ids


def question_ids(tokenizer: Tokenizer, question: str, first: bool = True) -> list[int]:
    """A question's turn: right after the image "\n{question} ASSISTANT:" (upstream's tokenization of the text after
    `<image>`); a later turn of a conversation "USER: {question} ASSISTANT:" (it follows the previous answer's EOS)."""
    check_question(question)
    return tokenizer.encode(f"\n{question} ASSISTANT:" if first else f"USER: {question} ASSISTANT:")


def answer_ids(tokenizer: Tokenizer, answer: str) -> list[int]:
    """An answer as the model produces it after "ASSISTANT:": its tokens, then EOS."""
    return tokenizer.encode(answer) + [tokenizer.eos_id]


def tokenize_with_image(prompt: str, tokenizer: Tokenizer) -> list[int]:
    """[BOS] + ids of each text chunk, with IMAGE_TOKEN_INDEX where `<image>` stood."""
    ids = [tokenizer.bos_id]
    for index, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk))
    return ids
