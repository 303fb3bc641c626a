"""The library's front door: `MobileVLM.from_pretrained(path)`, then `.ask(image, question)` or `.session(image)`."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mobilevlm_ros import choices
from mobilevlm_ros.choices import AUTO, IMAGE_MODES, LANGUAGE_BACKENDS, check_choice
from mobilevlm_ros.errors import ConfigError, PromptError
from mobilevlm_ros.model.config import MobileVLMConfig
from mobilevlm_ros.model.preprocess import ChannelOrder, ImageInput, ImageProcessor, to_pil_rgb
from mobilevlm_ros.model.prompt import IMAGE_PLACEHOLDER, Tokenizer, build_prompt, check_question, tiled_image_text, tokenize_with_image
from mobilevlm_ros.model.tiling import DEFAULT_MAX_TILES, Box, Grid, roi_box, tile_boxes, tile_grid
from mobilevlm_ros.runtime.backends import default_device, load_language, open_vision, resolve_artifacts
from mobilevlm_ros.runtime.language import LanguageBackend
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import PerTileSession, Session
from mobilevlm_ros.runtime.vision import VisionBackend

logger = logging.getLogger(__name__)

Roi = tuple[int, int, int, int]  # x, y, width, height in pixels of the frame


@dataclass(frozen=True)
class FrameViews:
    """What the vision backend sees of one frame in one mode (one batch), and how the prompt holds it."""

    mode: str  # one of IMAGE_MODES
    images: list[Image.Image]
    image_text: str  # the prompt's image part when all images go in one prompt: `<image>`s and separators
    boxes: list[Box | None]  # where each image lies in the frame; None = the whole frame
    grid: Grid  # the frame's tile grid (1x1 when it fits in one view)


class MobileVLM:
    """A loaded MobileVLM: the checkpoint's tokenizer, image processor and config, a vision backend (tower +
    projector) and a language backend; `from_pretrained` builds them (runtime/backends.py)."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, config: MobileVLMConfig, vision: VisionBackend,
                 language: LanguageBackend):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.vision = vision
        self.language = language

    @property
    def device(self) -> torch.device:
        """Where the vision backend runs (the node's diagnostics report it)."""
        return self.vision.device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        language: str = "torch",
        quant: str = "q4_k_s",
        engines_dir: str | Path | None = None,
        build: bool | str = "if_missing",
        vision: str = "torch",
        vision_precision: str = AUTO,
        int8: bool = False,
        llama_amx: bool | None = None,
        engine_path: str | Path | None = None,
    ) -> "MobileVLM":
        """Load a checkpoint directory; fp16 on CUDA and fp32 on CPU unless `dtype` says otherwise.

        Artifacts (GGUF, ONNX graph, TensorRT engine, mmproj) come from the artifact cache in `engines_dir` and are
        resolved before any weights load. `build` (choices.ENGINE_BUILD) says when they are built: "if_missing" (the
        default) builds a missing or stale one first, without the LLM in memory; "never" raises one ArtifactError
        naming every missing artifact and the `mobilevlm build` command for each (a robot's choice: no minutes-long
        build, and no build beside the loaded LLM, at start-up); "always" rebuilds them. True and False mean
        if_missing and never. `engine_path` puts the vision backend's artifact at that file (its manifest beside it,
        `<file>.json`) instead of the cache's name: an engine built ahead with `mobilevlm build --engine-path`.

        `language="llamacpp"` runs the LLM from a GGUF (`quant`: q4_k_s, q4_k_m, q8_0, f16, f32); torch then loads no
        LLM weights, only the vision tower and projector (in `dtype` on `device`) when torch runs the vision. Its
        sessions share one KV buffer of the context length, at most 4 open at once (BackendError beyond; a dropped
        session frees its place). The torch backend's sessions share one static KV buffer on CUDA (any number open).
        `llama_amx` lets llama.cpp use its AMX weight buffers; None (the default) does only on CPUs without AMX, because
        its AMX matmul crashes on some Intel CPUs that have it (ggml.py; CPU repacking stays on).
        `vision="onnxruntime"` runs the exported vision graph (`vision_precision` fp32, the default, or int8),
        `vision="tensorrt"` an engine built for this GPU (fp16, the default, fp32 or int8; int8 engines are built
        beforehand by `mobilevlm build --calibration-dir`), `vision="ggml"` llama.cpp's own image encoder (mtmd) on an
        mmproj GGUF (fp16, the default, or fp32; runtime/ggml_vision.py; on the GPU when llama.cpp was built with one,
        like the llamacpp language backend, whatever `device` says); they replace the torch tower and projector, whose
        weights are then never loaded. A precision the backend cannot run is a ConfigError (choices.py holds the table).
        `int8` quantizes the torch LLM's weights.
        """
        check_choice("language backend", language, LANGUAGE_BACKENDS)
        precision = choices.vision_precision(vision, vision_precision)  # a bad combination fails before anything loads
        policy = choices.engine_build_policy(build)
        if not Path(path).is_dir():
            raise ConfigError(f"{path}: not a directory")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        started = time.perf_counter()
        language_file, vision_file = resolve_artifacts(Path(path), language, quant, vision, precision, engines_dir, policy,
                                                       engine_path)
        checkpoint, language_backend = load_language(path, language, device, dtype, language_file, int8, llama_amx,
                                                     with_vision=vision == "torch")
        vision_backend = open_vision(vision, vision_file, checkpoint.model, device)
        vlm = cls(checkpoint.tokenizer, checkpoint.image_processor, checkpoint.config, vision_backend, language_backend)
        logger.info(
            "loaded %s (%s; vision %s, %s on %s; language %s) in %.1f s",
            path, vlm.config.mm_projector_type, vision_backend.name, dtype, device, language_backend.name, time.perf_counter() - started,
        )
        return vlm

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput], channel_order: ChannelOrder = "rgb") -> torch.Tensor:
        """Images -> their embeddings [len(images), num_image_tokens, hidden]: `image_processor.batch`, then one call
        of the vision backend `vision` (both public, for callers that time them apart). The embeddings stay where the
        backend made them; a language backend takes them to its own device and dtype."""
        return self.vision(self.image_processor.batch(images, channel_order))

    def encode_image(self, image: ImageInput, channel_order: ChannelOrder = "rgb") -> torch.Tensor:
        """One image -> its embeddings [1, num_image_tokens, hidden]."""
        return self.encode_images([image], channel_order)

    def views(
        self, image: ImageInput, mode: str = "overview", roi: Roi | None = None, max_tiles: int = DEFAULT_MAX_TILES,
        channel_order: ChannelOrder = "rgb",
    ) -> FrameViews:
        """The images `mode` shows the model of `image` (see IMAGE_MODES). Tiles are cells of MiniCPM-V's grid
        choice over the vision tower's image size with a `max_tiles` budget (model/tiling.py); `roi` is only for
        `crop`, which needs one. A bad mode raises PromptError, a region outside the frame ImageError."""
        if mode not in IMAGE_MODES:
            raise PromptError(f"unknown image mode {mode!r} (expected {', '.join(IMAGE_MODES)})")
        if (roi is not None) != (mode == "crop"):
            raise PromptError("mode crop needs a region of interest" if mode == "crop"
                              else f"a region of interest is only used by mode crop, not {mode}")
        frame = to_pil_rgb(image, channel_order)
        grid = tile_grid(frame.size, self.image_processor.crop_size, max_tiles)
        if mode == "overview":
            return FrameViews(mode, [frame], IMAGE_PLACEHOLDER, [None], grid)
        if mode == "crop":
            box = roi_box(roi, frame.size)
            return FrameViews(mode, [frame.crop(box)], IMAGE_PLACEHOLDER, [box], grid)
        boxes = tile_boxes(frame.size, grid) if grid != (1, 1) else []
        tiles = [frame.crop(box) for box in boxes]
        if mode == "tiles":
            return FrameViews(mode, [frame, *tiles], tiled_image_text(*grid), [None, *boxes], grid)
        return FrameViews(mode, tiles or [frame], IMAGE_PLACEHOLDER, boxes or [(0, 0, *frame.size)], grid)

    def session(
        self, image: ImageInput, channel_order: ChannelOrder = "rgb", keep_history: bool = False, mode: str = "overview",
        roi: Roi | None = None, max_tiles: int = DEFAULT_MAX_TILES,
    ) -> Session | PerTileSession:
        """Encode `image` as `mode` shows it (one vision call) and prefill [system prompt + image part] once, for any
        number of questions about it. `per_tile` gives a PerTileSession (ask only; no history)."""
        views = self.views(image, mode, roi, max_tiles, channel_order)
        return self.open_session(views, self.encode_images(views.images), keep_history)

    def open_session(self, views: FrameViews, image_embeds: torch.Tensor, keep_history: bool = False) -> Session | PerTileSession:
        """`session` for views already encoded (`image_embeds`: `encode_images(views.images)`), for callers that
        time or run the vision step themselves (the bench)."""
        if views.mode != "per_tile":
            return Session(self.language, self.tokenizer, image_embeds, keep_history, image_text=views.image_text)
        if keep_history:
            raise PromptError("per_tile asks each tile on its own and keeps no history")
        return PerTileSession(self.language, self.tokenizer, image_embeds, views.boxes)

    def ask(
        self,
        image: ImageInput,
        question: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int | None = None,
        channel_order: ChannelOrder = "rgb",
        mode: str = "overview",
        roi: Roi | None = None,
        max_tiles: int = DEFAULT_MAX_TILES,
    ) -> str:
        """Answer `question` about `image` (greedy by default, like upstream's benchmarks). `mode` (IMAGE_MODES):
        "overview" (upstream's one padded view), "tiles", "per_tile" or "crop" with `roi` = (x, y, width, height)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        check_question(question)  # an empty question fails before the image is encoded
        return self.session(image, channel_order, mode=mode, roi=roi, max_tiles=max_tiles).ask(question, params).text

    def prompt_ids(self, question: str, image_text: str = IMAGE_PLACEHOLDER) -> list[int]:
        """The whole "v1" prompt's token ids, with an image placeholder where each image's embeddings go."""
        return tokenize_with_image(build_prompt(question, image_text), self.tokenizer)
