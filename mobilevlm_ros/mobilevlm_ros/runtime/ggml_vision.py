"""The `ggml` vision backend: llama.cpp's own image encoder (`mtmd`, its CLIP + LDP graphs in ggml) running the
mmproj GGUF that export/mmproj.py writes, through llama-cpp-python's bindings of libmtmd (`llama_cpp.mtmd_cpp`).

mtmd takes 8-bit RGB bitmaps, not float pixels: it resizes and pads a bitmap to its image size itself, then scales
and normalizes it. This backend hands it the square the model sees, already padded and resized by our preprocessing
(model/preprocess.py: upstream's pad colour and PIL bicubic), so mtmd's own resize does nothing and its pixels are
ours. `__call__` keeps the VisionBackend protocol: the normalized pixel_values are turned back into those 8-bit
squares (exact for pixels our image processor made, which come from 8-bit images; other values are rounded to the
8-bit grid); `encode_squares` takes the squares directly.

An upstream defect (llama-cpp-python 0.3.36's llama.cpp): an mtmd context opened without a text model leaves its
position type uninitialized, and when the garbage reads as HunyuanVL's layout an image chunk counts (nx + 1) * ny + 2
tokens instead of nx * ny, and encoding it aborts the process ("Output buffer size mismatch", seen in about 1 of 10
test runs). So each context opened here is checked: a blank square must tokenize to nx * ny tokens, else another is
opened (`_open_context`); `_encode_one` checks every chunk the same way before encoding it.

Native state: one mtmd context per backend, freed by `close()` or when the backend is collected; llama.cpp's and
clip's log lines go to Python logging (runtime/llamacpp.py routes them), never to stdout or stderr. clip loads its
weights into its backend's default buffer type (the CPU's or the GPU's), never into the CPU's extra buffer types
(CPU_REPACK, AMX), so the AMX selection of runtime/llamacpp.py does not concern it.
"""

import ctypes
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import torch

from mobilevlm_ros.cpu import physical_cores
from mobilevlm_ros.errors import ArtifactError, BackendError
from mobilevlm_ros.ggml import init_mtmd

logger = logging.getLogger(__name__)
CONTEXT_ATTEMPTS = 5  # mtmd contexts opened before giving up on one whose image token count is sane (module docstring)

# The tensor whose length is the mmproj's output width, per clip projector type.
_OUTPUT_BIAS = {"ldpv2": "mm.model.peg.0.bias", "ldp": "mm.model.mb_block.2.block.2.1.bias", "mlp": "mm.2.bias"}
# How far (in 8-bit steps) normalized pixels may lie from the 8-bit grid before the rounding is worth a warning.
_OFF_GRID = 0.05

def read_mmproj_header(path: Path) -> dict[str, object]:
    """What the backend needs to know of an mmproj file: projector type, image size, mean/std, output width."""
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: not a readable GGUF file ({error})") from error

    def field(key: str):
        if key not in reader.fields:
            raise ArtifactError(f"{path}: not an mmproj GGUF (no {key})")
        return reader.fields[key].contents()

    projector_type = field("clip.projector_type")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    bias = tensors.get(_OUTPUT_BIAS.get(projector_type, ""))
    if bias is None:
        raise ArtifactError(f"{path}: projector type {projector_type!r} is not one this backend reads (ldpv2, ldp, mlp)")
    return {
        "projector_type": projector_type,
        "image_size": int(field("clip.vision.image_size")),
        "image_mean": np.asarray(field("clip.vision.image_mean"), dtype=np.float32),
        "image_std": np.asarray(field("clip.vision.image_std"), dtype=np.float32),
        "hidden_size": int(bias.shape[0]),
        "file_type": "f16" if field("general.file_type") == 1 else "f32",
    }


class GgmlVision:
    """mtmd over one mmproj GGUF: pixel_values [B, 3, S, S] (or 8-bit squares [B, S, S, 3]) -> [B, tokens, hidden]."""

    name = "ggml"

    def __init__(self, mmproj_path: str | Path, threads: int | None = None, use_gpu: bool = True, warmup: bool = True):
        """`threads` defaults to the physical cores (as the llama.cpp language backend); `use_gpu` lets a CUDA (or
        other GPU) build of llama.cpp run the encoder on its first GPU (a CPU build ignores it); `warmup` runs one
        encode at load so the first frame does not pay for allocating the compute buffers."""
        init_mtmd()
        self.path = Path(mmproj_path)
        header = read_mmproj_header(self.path)
        self.projector_type = header["projector_type"]
        self.image_size = header["image_size"]
        self.hidden_size = header["hidden_size"]
        self.file_type = header["file_type"]
        self._mean, self._std = header["image_mean"], header["image_std"]
        self.threads = threads or physical_cores()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = self.threads
        params.print_timings = False
        params.warmup = warmup
        self._context = self._open_context(params)
        self._lock = threading.Lock()  # one mtmd context: encodes from several threads must not interleave
        self._finalizer = weakref.finalize(self, mtmd.mtmd_free, self._context)
        self._warned_off_grid = False
        logger.info("mtmd: %s (%s, %s), %d threads", self.path.name, self.projector_type, self.file_type, self.threads)

    def _open_context(self, params: mtmd.mtmd_context_params) -> int:
        """An mtmd context on the mmproj whose image chunks count nx * ny tokens (module docstring: without a text
        model, upstream leaves the count to uninitialized memory). A context that fails the check stays open until
        another passes: freed at once, its memory would come straight back, garbage and all, to the next one."""
        blank = np.full((self.image_size, self.image_size, 3), 128, np.uint8)
        rejected: list[int] = []
        try:
            for _ in range(CONTEXT_ATTEMPTS):
                # No text model: the backend only encodes images (mtmd then skips its vocabulary and width checks).
                context = mtmd.mtmd_init_from_file(str(self.path).encode(), None, params)
                if not context:
                    raise ArtifactError(f"{self.path}: llama.cpp's mtmd cannot load this mmproj (see the llama_cpp log)")
                with self._image_chunk(context, blank) as (_, counted, expected):
                    if counted == expected:
                        return context
                logger.debug("mtmd context counts %d tokens for an image of %d: opening another", counted, expected)
                rejected.append(context)
            raise BackendError(f"{self.path.name}: {CONTEXT_ATTEMPTS} mtmd contexts in a row miscounted an image's "
                               "tokens (llama.cpp's uninitialized position type, see the llama_cpp log)")
        finally:
            for context in rejected:
                mtmd.mtmd_free(context)

    @staticmethod
    @contextmanager
    def _image_chunk(context: int, image: np.ndarray) -> Iterator[tuple[int, int, int]]:
        """`image` (8-bit RGB [H, W, 3]) tokenized by `context`: its one image chunk, the tokens mtmd counts for it
        and the nx * ny it should count; the chunk lives until the block ends."""
        height, width, _ = image.shape
        bitmap = mtmd.mtmd_bitmap_init(width, height, image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        if not bitmap:
            raise BackendError(f"mtmd cannot take a {width}x{height} image")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            part = mtmd.mtmd_input_part(text=None, bitmap=bitmap)
            parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
            if status := mtmd.mtmd_tokenize_from_parts(context, chunks, parts, 1, False):
                raise BackendError(f"mtmd could not prepare the image (status {status}; see the llama_cpp log)")
            if mtmd.mtmd_input_chunks_size(chunks) != 1:
                raise BackendError(f"mtmd split one image into {mtmd.mtmd_input_chunks_size(chunks)} chunks")
            chunk = mtmd.mtmd_input_chunks_get(chunks, 0)
            tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
            expected = mtmd.mtmd_image_tokens_get_nx(tokens) * mtmd.mtmd_image_tokens_get_ny(tokens)
            yield chunk, mtmd.mtmd_input_chunk_get_n_tokens(chunk), expected
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        """Free the mtmd context now (otherwise when the backend is collected)."""
        self._finalizer()

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.encode_squares(self.to_squares(pixel_values)))

    def to_squares(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Normalized pixel_values [B, 3, S, S] -> the 8-bit RGB squares [B, S, S, 3] they were made from."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be [B, 3, {self.image_size}, {self.image_size}], got {list(pixel_values.shape)}")
        values = np.moveaxis(pixel_values.detach().to("cpu", torch.float32).numpy(), 1, -1)
        levels = (values * self._std + self._mean) * 255.0
        rounded = np.clip(np.rint(levels), 0, 255)
        if not self._warned_off_grid and float(np.abs(levels - rounded).max(initial=0.0)) > _OFF_GRID:
            self._warned_off_grid = True
            logger.warning("pixel values are not 8-bit image levels: mtmd takes 8-bit RGB, so they are rounded to it")
        return rounded.astype(np.uint8)

    def encode_squares(self, squares: np.ndarray) -> np.ndarray:
        """8-bit RGB squares [B, S, S, 3] (or one [S, S, 3]) -> float32 embeddings [B, tokens, hidden]. Squares of
        another size or shape are resized and padded by mtmd itself (its Pillow-style bicubic)."""
        if squares.ndim == 3:
            squares = squares[None]
        if squares.ndim != 4 or squares.shape[-1] != 3 or squares.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images [B, H, W, 3], got {squares.dtype} {list(squares.shape)}")
        with self._lock:
            if not self._finalizer.alive:
                raise BackendError(f"{self.path.name}: the mtmd context is closed")
            return np.stack([self._encode_one(np.ascontiguousarray(square)) for square in squares])

    def _encode_one(self, image: np.ndarray) -> np.ndarray:
        with self._image_chunk(self._context, image) as (chunk, tokens, expected):
            if tokens != expected:  # encoding it would abort the process (module docstring)
                raise BackendError(f"mtmd counts {tokens} tokens for an image of {expected}; not encoding it")
            if status := mtmd.mtmd_encode_chunk(self._context, chunk):
                raise BackendError(f"mtmd could not encode the image (status {status}; see the llama_cpp log)")
            output = mtmd.mtmd_get_output_embd(self._context)
            return np.ctypeslib.as_array(output, shape=(tokens, self.hidden_size)).copy()
