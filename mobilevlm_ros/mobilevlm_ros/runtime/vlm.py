"""The library's front door: `MobileVLM.from_pretrained(path)`, then `.ask(image, question)` or `.session(image)`."""

import logging
import time
from pathlib import Path
from typing import Literal

import torch

from mobilevlm_ros.errors import ConfigError, PromptError
from mobilevlm_ros.model.checkpoint import LoadedCheckpoint, load_checkpoint
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
from mobilevlm_ros.model.preprocess import ChannelOrder, ImageInput
from mobilevlm_ros.model.prompt import build_prompt, tokenize_with_image
from mobilevlm_ros.runtime.language import LanguageBackend, TorchLanguageModel
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import Session
from mobilevlm_ros.runtime.vision import OnnxRuntimeVision, TorchVision, VisionBackend

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def vision_backend(
    model: MobileLlamaForCausalLM, model_dir: Path, name: str, precision: str, device: torch.device,
    engines_dir: str | Path | None, build: bool,
) -> VisionBackend:
    """The vision backend `name`, its graph or engine taken from (or built into) the artifact cache."""
    engines = Path(engines_dir) if engines_dir is not None else None
    if name == "torch":
        return TorchVision(model)
    if name == "onnxruntime":
        from mobilevlm_ros.export.onnx import onnx_artifact

        return OnnxRuntimeVision(onnx_artifact(model, model_dir, engines, build).path, device)
    if name == "tensorrt":
        from mobilevlm_ros.export.tensorrt import engine_artifact
        from mobilevlm_ros.runtime.tensorrt import TensorRTVision, tensorrt_unavailable_reason

        if reason := tensorrt_unavailable_reason():
            raise ConfigError(f"vision backend tensorrt cannot run here: {reason}")
        return TensorRTVision(engine_artifact(model, model_dir, precision, engines, build).path, device)
    raise ConfigError(f"unknown vision backend {name!r} (expected torch, onnxruntime or tensorrt)")


class MobileVLM:
    """A loaded MobileVLM: the torch vision path (tower + projector) and a language backend."""

    def __init__(self, checkpoint: LoadedCheckpoint, language: LanguageBackend | None = None, vision: VisionBackend | None = None):
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.image_processor = checkpoint.image_processor
        self.config = checkpoint.config
        self.language = language or TorchLanguageModel(self.model, self.config.context_length)
        self.vision = vision or TorchVision(self.model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        language: Literal["torch", "llamacpp"] = "torch",
        quant: str = "q4_k_s",
        engines_dir: str | Path | None = None,
        build: bool = True,
        vision: Literal["torch", "onnxruntime", "tensorrt"] = "torch",
        vision_precision: Literal["fp16", "fp32", "int8"] = "fp16",
        int8: bool = False,
    ) -> "MobileVLM":
        """Load a checkpoint directory; fp16 on CUDA and fp32 on CPU unless `dtype` says otherwise.

        `language="llamacpp"` runs the LLM from a GGUF (`quant`: q4_k_s, q4_k_m, q8_0, f16, f32) taken from the artifact
        cache in `engines_dir`, built there first when missing or stale (or an ArtifactError with `build=False`).
        Then only the vision tower and projector are loaded into torch, in `dtype` on `device`. Its sessions share one
        KV buffer of the context length, at most 4 open at once (BackendError beyond; a dropped session frees its place).
        `vision="onnxruntime"` runs the exported vision graph, `vision="tensorrt"` an engine built for this GPU in
        `vision_precision`; both come from the same artifact cache. `int8` quantizes the torch LLM's weights.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        started = time.perf_counter()
        if language == "torch":
            checkpoint = load_checkpoint(path, dtype=dtype, device=device)
            vlm = cls(checkpoint, TorchLanguageModel(checkpoint.model, checkpoint.config.context_length, int8=int8))
        elif language == "llamacpp":
            from mobilevlm_ros.export.gguf import llm_gguf_artifact
            from mobilevlm_ros.runtime.llamacpp import LlamaCppLanguageModel

            artifact = llm_gguf_artifact(path, quant, engines_dir, build)
            checkpoint = load_checkpoint(path, dtype=dtype, device=device, with_language_model=False)
            vlm = cls(checkpoint, LlamaCppLanguageModel(artifact.path, checkpoint.config.context_length))
        else:
            raise ConfigError(f"unknown language backend {language!r} (expected torch or llamacpp)")
        vlm.vision = vision_backend(vlm.model, Path(path), vision, vision_precision, device, engines_dir, build)
        logger.info(
            "loaded %s (%s; vision %s, %s on %s; language %s) in %.1f s",
            path, vlm.config.mm_projector_type, vlm.vision.name, dtype, device, vlm.language.name, time.perf_counter() - started,
        )
        return vlm

    @property
    def device(self) -> torch.device:
        """Where the vision path runs (the language backend may keep the LLM elsewhere)."""
        return next(self.model.model.mm_projector.parameters()).device

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.model.model.mm_projector.parameters()).dtype

    @torch.inference_mode()
    def encode_image(self, image: ImageInput, channel_order: ChannelOrder = "rgb") -> torch.Tensor:
        """One image -> its embeddings [1, num_image_tokens, hidden]."""
        pixel_values = self.image_processor(image, channel_order).unsqueeze(0)
        return self.vision(pixel_values).to(self.device, self.vision_dtype)

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
