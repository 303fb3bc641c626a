"""The library's front door: `MobileVLM.from_pretrained(path)`, then `.ask(image, question)` or `.session(image)`."""

import logging
import time
from pathlib import Path

import torch

from mobilevlm_ros.errors import PromptError
from mobilevlm_ros.model.checkpoint import LoadedCheckpoint, load_checkpoint
from mobilevlm_ros.model.preprocess import ChannelOrder, ImageInput
from mobilevlm_ros.model.prompt import build_prompt, tokenize_with_image
from mobilevlm_ros.runtime.language import LanguageBackend, TorchLanguageModel
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import Session

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MobileVLM:
    """A loaded MobileVLM: the torch vision path (tower + projector) and a language backend."""

    def __init__(self, checkpoint: LoadedCheckpoint, language: LanguageBackend | None = None):
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.image_processor = checkpoint.image_processor
        self.config = checkpoint.config
        self.language = language or TorchLanguageModel(self.model, self.config.context_length)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "MobileVLM":
        """Load a checkpoint directory; fp16 on CUDA and fp32 on CPU unless `dtype` says otherwise."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        started = time.perf_counter()
        vlm = cls(load_checkpoint(path, dtype=dtype, device=device))
        logger.info("loaded %s (%s, %s on %s) in %.1f s", path, vlm.config.mm_projector_type, dtype, device, time.perf_counter() - started)
        return vlm

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.inference_mode()
    def encode_image(self, image: ImageInput, channel_order: ChannelOrder = "rgb") -> torch.Tensor:
        """One image -> its embeddings [1, num_image_tokens, hidden]."""
        pixel_values = self.image_processor(image, channel_order).unsqueeze(0)
        return self.model.encode_images(pixel_values.to(self.device, self.model.dtype))

    def session(self, image: ImageInput, channel_order: ChannelOrder = "rgb", keep_history: bool = False) -> Session:
        """Encode `image` and prefill [system prompt + image] once, for any number of questions about it."""
        return Session(self.language, self.tokenizer, self.encode_image(image, channel_order)[0], keep_history)

    def ask(
        self,
        image: ImageInput,
        question: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int | None = None,
        channel_order: ChannelOrder = "rgb",
    ) -> str:
        """Answer `question` about `image` (greedy by default, like upstream's benchmarks)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        build_prompt(question)  # an empty question fails before the image is encoded
        return self.session(image, channel_order).ask(question, params).text

    def prompt_ids(self, question: str) -> list[int]:
        """The whole "v1" prompt's token ids, with the image placeholder where the image embeddings go."""
        return tokenize_with_image(build_prompt(question), self.tokenizer)

    @torch.inference_mode()
    def prompt_embeds(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        """Input embeddings [1, T, hidden] of a whole prompt with the image spliced in (for the plain transformers path)."""
        embeds = self.model.embed_with_images(input_ids, image_embeds)
        if embeds.shape[1] >= self.config.context_length:
            raise PromptError(f"prompt is {embeds.shape[1]} tokens with the image; the context holds {self.config.context_length}")
        return embeds
