"""The `llamacpp-mtmd` baseline: MobileVLM as llama.cpp itself runs it, image -> answer through libmtmd (its CLIP +
LDP graphs) and llama.cpp on the same GGUF, driven through llama-cpp-python's bindings of the C API
(`llama_cpp.mtmd_cpp`, `llama_cpp`) the way llama.cpp's own `llama-mtmd-cli` drives them:

- the camera frame's RGB bytes become an `mtmd_bitmap` (`mtmd_bitmap_init`: no image file to decode, as our pipeline
  takes the frame as it is);
- the "v1" prompt with mtmd's media marker where the image goes is tokenized by `mtmd_tokenize` (text chunks, and
  the image chunk for which mtmd resizes, pads and normalizes the bitmap itself);
- the chunks are evaluated in order by the steps of `mtmd_helper_eval_chunks`, called one by one so that the image
  encode gets a clock reading of its own: `mtmd_helper_eval_chunk_single` for a text chunk, and for the image chunk
  what that helper does for it, `mtmd_encode_chunk` then `mtmd_helper_decode_image_chunk` on `mtmd_get_output_embd`
  (llama-mtmd-cli splits them the same way);
- then llama.cpp's own sampler (a chain of a logit bias of -inf on EOS and greedy) and `llama_decode`, token by token,
  to exactly the answer length our pipeline generates.

Not `Llava15ChatHandler`: it formats LLaVA-1.5's template, decodes an image file (base64 data or a URL) for every
call and runs the text chunks through `Llama.eval` in Python; its stages happen inside one `create_chat_completion`
and cannot be timed apart. The C API is what llama.cpp's tools run, and every stage can be timed.

A second question on the same frame is timed twice, since mtmd keeps nothing between prompts:
- `second_ttft_s`, a new conversation: tokenize, encode and evaluate the whole prompt again (what llama-mtmd-cli does
  per prompt, and Llava15ChatHandler per call: it clears the KV cache first);
- `second_ttft_cached_s`, with llama-server's prompt cache: the KV cache of the first prompt is cut after the longest
  common prefix of the two prompts' chunks (text tokens equal, image chunks by the bitmap's id and token count, as
  `server_tokens::get_common_prefix` compares them), and only the rest is evaluated. The new prompt is still
  tokenized, so mtmd still preprocesses the image, as the server does per request.

Settings that are llama.cpp's defaults, as its tools use them: the model file memory-mapped, flash attention `auto`.
Settings made equal to our pipeline's: threads (vision and language), the context (the model's length), the batch
(512), and the CPU buffer types llama.cpp may put weights in (`ggml.model_load`, AMX as ours).

No torch in this process (a llama.cpp user has none), so its peak RSS is llama.cpp's and mtmd's alone.
"""

import ctypes
import time
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from mobilevlm_ros.bench.harness import Run
from mobilevlm_ros.bench.workload import FIRST_QUESTION, SECOND_QUESTION, answer_metrics, bench_frame
from mobilevlm_ros.cpu import physical_cores
from mobilevlm_ros.ggml import init_mtmd, model_load
from mobilevlm_ros.model.prompt import build_prompt

BATCH = 512  # as our llama.cpp backend's batch_size


class _Failed(RuntimeError):
    pass


def _check(status: int, what: str) -> None:
    if status != 0:
        raise _Failed(f"{what} failed with status {status} (see the llama_cpp log)")


class MtmdPipeline:
    """One llama.cpp model and context, one mtmd context on the mmproj, one greedy sampler that never picks EOS."""

    def __init__(self, gguf_path: str, mmproj_path: str, amx: bool | None, threads: int | None = None):
        init_mtmd()
        self.threads = threads or physical_cores()
        model_params = llama_cpp.llama_model_default_params()  # llama.cpp's defaults: the file is memory-mapped
        with model_load(amx) as self.buffers:
            self.model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), model_params)
        if not self.model:
            raise _Failed(f"{gguf_path}: llama.cpp cannot load this GGUF file")
        params = llama_cpp.llama_context_default_params()  # flash attention: llama.cpp's default (auto)
        params.n_ctx = llama_cpp.llama_model_n_ctx_train(self.model)
        params.n_batch = params.n_ubatch = BATCH
        params.n_threads = params.n_threads_batch = self.threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        if not self.context:
            raise _Failed("llama.cpp cannot create a context")
        self.memory = llama_cpp.llama_get_memory(self.context)
        mtmd_params = mtmd.mtmd_context_params_default()
        mtmd_params.n_threads = self.threads
        mtmd_params.print_timings = False
        self.mtmd = mtmd.mtmd_init_from_file(mmproj_path.encode(), self.model, mtmd_params)
        if not self.mtmd:
            raise _Failed(f"{mmproj_path}: llama.cpp's mtmd cannot load this mmproj for this model")
        self.marker = mtmd.mtmd_default_marker().decode()
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        never_eos = (llama_cpp.llama_logit_bias * 1)(llama_cpp.llama_logit_bias(llama_cpp.llama_vocab_eos(vocab), float("-inf")))
        llama_cpp.llama_sampler_chain_add(
            self.sampler, llama_cpp.llama_sampler_init_logit_bias(llama_cpp.llama_vocab_n_tokens(vocab), 1, never_eos)
        )
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())
        self._token = (llama_cpp.llama_token * 1)()

    def bitmap(self, frame: Any, frame_id: bytes = b"frame") -> Any:
        """The frame's RGB bytes as an mtmd bitmap (copied), with an id for llama-server's prompt-cache matching."""
        height, width, _ = frame.shape
        bitmap = mtmd.mtmd_bitmap_init(width, height, frame.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        if not bitmap:
            raise _Failed(f"mtmd cannot take a {width}x{height} frame")
        mtmd.mtmd_bitmap_set_id(bitmap, frame_id)
        return bitmap

    def tokenize(self, question: str, bitmap: Any) -> Any:
        """The v1 prompt with the image marker -> mtmd's chunks (BOS added, special tokens parsed)."""
        text = build_prompt(question, self.marker).encode()
        source = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=True, parse_special=True)
        chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        _check(mtmd.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(source), bitmaps, 1), "mtmd_tokenize")
        return chunks

    def evaluate(self, chunks: Any, start: int = 0) -> float:
        """The chunks from position `start` on (the earlier positions are in the KV cache), as
        `mtmd_helper_eval_chunks` evaluates them, logits for the last position; the seconds spent encoding images."""
        encode_s, position = 0.0, 0
        count = mtmd.mtmd_input_chunks_size(chunks)
        for index in range(count):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            positions = mtmd.mtmd_input_chunk_get_n_pos(chunk)
            last = index == count - 1
            if position + positions <= start:  # wholly in the cache
                position += positions
                continue
            new_position = llama_cpp.llama_pos(position)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                if position < start:  # partly in the cache: the rest of its tokens
                    tokens = _text_tokens(chunk)[start - position :]
                    batch = (llama_cpp.llama_token * len(tokens))(*tokens)
                    _check(llama_cpp.llama_decode(self.context, llama_cpp.llama_batch_get_one(batch, len(tokens))), "llama_decode")
                    position += positions
                    continue
                _check(mtmd.mtmd_helper_eval_chunk_single(self.mtmd, self.context, chunk, position, 0, BATCH, last,
                                                          ctypes.byref(new_position)), "mtmd_helper_eval_chunk_single")
            else:
                started = time.perf_counter()
                _check(mtmd.mtmd_encode_chunk(self.mtmd, chunk), "mtmd_encode_chunk")
                encode_s += time.perf_counter() - started
                _check(mtmd.mtmd_helper_decode_image_chunk(
                    self.mtmd, self.context, chunk, mtmd.mtmd_get_output_embd(self.mtmd), position, 0, BATCH,
                    ctypes.byref(new_position), mtmd.mtmd_helper_post_decode_callback(), None,
                ), "mtmd_helper_decode_image_chunk")
            position = new_position.value
        return encode_s

    def generate(self, new_tokens: int) -> list[float]:
        """Greedy tokens (never EOS) after the evaluated prompt: the clock reading at each one."""
        llama_cpp.llama_sampler_reset(self.sampler)
        times = []
        for index in range(new_tokens):
            self._token[0] = llama_cpp.llama_sampler_sample(self.sampler, self.context, -1)
            times.append(time.perf_counter())
            if index + 1 < new_tokens:
                _check(llama_cpp.llama_decode(self.context, llama_cpp.llama_batch_get_one(self._token, 1)), "llama_decode")
        return times

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def keep(self, positions: int) -> None:
        """Cut the KV cache after its first `positions` positions."""
        if not llama_cpp.llama_memory_seq_rm(self.memory, 0, positions, -1):
            raise _Failed(f"llama.cpp cannot cut its KV cache at {positions}")


def _text_tokens(chunk: Any) -> list[int]:
    count = ctypes.c_size_t()
    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
    return [tokens[i] for i in range(count.value)]


def chunk_items(chunks: Any) -> list[tuple[str, Any, int]]:
    """(kind, content, positions) per chunk: ("text", token ids, n) or ("image", the bitmap's id, n)."""
    items = []
    for index in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, index)
        positions = mtmd.mtmd_input_chunk_get_n_pos(chunk)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            items.append(("text", _text_tokens(chunk), positions))
        else:
            items.append(("image", (mtmd.mtmd_input_chunk_get_id(chunk), mtmd.mtmd_input_chunk_get_n_tokens(chunk)), positions))
    return items


def common_prefix(cached: list[tuple[str, Any, int]], new: list[tuple[str, Any, int]]) -> int:
    """Positions at the start of `new` that `cached` already holds, as llama-server's prompt cache finds them: text
    token by token, an image only whole and only with the same id and token count."""
    positions = 0
    for (kind, content, count), (new_kind, new_content, _) in zip(cached, new, strict=False):
        if kind != new_kind:
            break
        if kind == "image":
            if content != new_content or content[0] is None:
                break
            positions += count
            continue
        same = next((i for i, (a, b) in enumerate(zip(content, new_content, strict=False)) if a != b), min(len(content), len(new_content)))
        positions += same
        if same < len(content) or same < len(new_content):
            break
    return positions


def setup_llamacpp_mtmd(gguf_path: str, mmproj_path: str, amx: bool | None) -> tuple[Run, dict[str, Any]]:
    """llama.cpp's image pipeline on the same GGUF as ours and the checkpoint's mmproj (see the module docstring)."""
    started = time.perf_counter()
    pipeline = MtmdPipeline(gguf_path, mmproj_path, amx)
    load_s = time.perf_counter() - started
    frame = bench_frame()

    def run(new_tokens: int) -> dict[str, float]:
        pipeline.clear()
        t0 = time.perf_counter()
        bitmap = pipeline.bitmap(frame)
        first_chunks = pipeline.tokenize(FIRST_QUESTION, bitmap)
        t1 = time.perf_counter()
        encode_s = pipeline.evaluate(first_chunks)
        first = pipeline.generate(new_tokens)
        prompt_tokens = mtmd.mtmd_helper_get_n_tokens(first_chunks)
        # The second question with llama-server's prompt cache: the first prompt (and its answer) are in the cache.
        t3 = time.perf_counter()
        cached_chunks = pipeline.tokenize(SECOND_QUESTION, bitmap)
        kept = common_prefix(chunk_items(first_chunks), chunk_items(cached_chunks))
        pipeline.keep(kept)
        pipeline.evaluate(cached_chunks, kept)
        cached = pipeline.generate(1)
        # The second question in a new conversation: the whole prompt again, image encode included.
        t4 = time.perf_counter()
        pipeline.clear()
        second_chunks = pipeline.tokenize(SECOND_QUESTION, bitmap)
        pipeline.evaluate(second_chunks)
        second = pipeline.generate(1)
        for chunks in (first_chunks, cached_chunks, second_chunks):
            mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        # The image encode happens between the first text chunk's evaluation and the image chunk's: counting it right
        # after preprocessing keeps the stages as ours has them (prefill = time to first token - preprocessing - vision).
        return answer_metrics(t0, t1, t1 + encode_s, first, t4, second, prompt_tokens) | {
            "second_ttft_cached_s": cached[0] - t3, "cached_prefix_tokens": kept,
        }

    info = {"pipeline": "llama.cpp mtmd C API as llama-mtmd-cli: mtmd_tokenize, mtmd_helper_eval_chunks' steps, greedy sampler",
            "load_s": load_s, "vision_threads": pipeline.threads, "llama_cpp_buffers": pipeline.buffers,
            "mmproj": Path(mmproj_path).name, "flash_attention": "auto (llama.cpp's default; ours: off)", "mmap": True}
    return run, info
