"""The library's front door: `MobileVLM.from_pretrained(path).ask(image, question)`."""

import logging
import time
from pathlib import Path

import torch

from mobilevlm_ros.errors import PromptError
from mobilevlm_ros.model.checkpoint import LoadedCheckpoint, load_checkpoint
from mobilevlm_ros.model.preprocess import ChannelOrder, ImageInput
from mobilevlm_ros.model.prompt import build_prompt, tokenize_with_image
from mobilevlm_ros.runtime.generate import generate_tokens
from mobilevlm_ros.runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MobileVLM:
    """A loaded MobileVLM: image + question -> answer, with the torch backend (CPU, or CUDA when present)."""

    def __init__(self, checkpoint: LoadedCheckpoint):
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.image_processor = checkpoint.image_processor
        self.config = checkpoint.config

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

    def prompt_ids(self, question: str) -> list[int]:
        """The "v1" prompt's token ids, with the image placeholder where the image embeddings go."""
        return tokenize_with_image(build_prompt(question), self.tokenizer)

    @torch.inference_mode()
    def prompt_embeds(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        """Input embeddings [1, T, hidden] of the prompt with the image spliced in; fails if they overflow the context."""
        embeds = self.model.embed_with_images(input_ids, image_embeds)
        if embeds.shape[1] >= self.config.context_length:
            raise PromptError(f"prompt is {embeds.shape[1]} tokens with the image; the context holds {self.config.context_length}")
        return embeds

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
        input_ids = self.prompt_ids(question)
        embeds = self.prompt_embeds(input_ids, self.encode_image(image, channel_order))
        tokens = list(generate_tokens(self.model, embeds, self.tokenizer.eos_id, params, self.config.context_length))
        return self.tokenizer.decode(tokens).strip()
