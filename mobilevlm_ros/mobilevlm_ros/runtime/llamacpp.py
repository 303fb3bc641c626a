"""The llama.cpp language backend: a GGUF MobileLLaMA driven through llama-cpp-python's low-level C API.

The high-level `llama_cpp.Llama` cannot take image embeddings, so this drives llama.cpp directly: one context whose
KV buffer holds a few sequences, one sequence per `KVCache`. Tokens and image embeddings (`llama_batch.embd`)
are appended with `llama_decode`; truncating a cache removes the sequence's tail with `llama_memory_seq_rm`.

The KV buffer is unified: its cells (by default the model's context length) are shared by the open caches, so memory
stays that of one full conversation however many sessions are open. A cache can grow to the whole context when the
others are small; when the cells run out, the append fails with BackendError and the cache is unchanged.

llama.cpp's process-wide state (its log, backend initialisation, the CPU buffer types a model may use) is in ggml.py.
"""

import logging
import threading
import weakref
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from mobilevlm_ros.cpu import physical_cores
from mobilevlm_ros.errors import ArtifactError, BackendError
from mobilevlm_ros.ggml import init_llama_cpp, model_load
from mobilevlm_ros.runtime.language import check_room

logger = logging.getLogger(__name__)


FLASH_ATTENTION_TYPES = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                         "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}


def flash_attention_setting(flash_attention: bool | None, offloaded: bool) -> str:
    """"auto", "on" or "off" (FLASH_ATTENTION_TYPES): None is auto when layers are offloaded to a GPU, else off (the
    CPU path as it was measured); a bool forces it."""
    if flash_attention is None:
        return "auto" if offloaded else "off"
    return "on" if flash_attention else "off"


class LlamaCppLanguageModel:
    """A GGUF model with one llama.cpp context; `new_cache()` hands out one of its `max_sequences` sequences."""

    name = "llamacpp"

    def __init__(
        self,
        gguf_path: str | Path,
        context_length: int | None = None,
        max_sequences: int = 4,
        kv_cells: int | None = None,
        threads: int | None = None,
        batch_size: int = 512,
        flash_attention: bool | None = None,
        gpu_layers: int = -1,
        mmap: bool = False,
        amx: bool | None = None,
    ):
        """`context_length` defaults to the model's; `kv_cells` (shared by all sequences) to `context_length`.
        `gpu_layers` -1 offloads every layer when llama.cpp was built with a GPU backend (ignored otherwise: a CPU-only
        build next to a CUDA GPU is logged as a warning, since the LLM then runs on the CPU cores).
        `flash_attention` None (the default) is llama.cpp's automatic choice (on where the device holding the layers
        supports it) when layers are offloaded to a GPU, and off on the CPU; True or False force it.
        `mmap` maps the file instead of reading it: the CPU backend repacks quantized weights into its own buffers,
        and the mapped pages it read stay resident too (a 1.4B Q4_K_S model adds 1.8 GB of RSS mapped, 1.2 GB read).
        `amx` lets llama.cpp use its AMX buffer type (None: only on CPUs without AMX, see `ggml.amx_allowed`)."""
        init_llama_cpp()
        self.path = Path(gguf_path)
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        if gpu_layers != 0 and not offload and torch.cuda.is_available():
            logger.warning("llama-cpp-python %s is a CPU-only build: the language model runs on the CPU cores although a CUDA "
                           "GPU is present; build it with CUDA (README: llama.cpp on a Jetson)", llama_cpp.__version__)
        self.flash_attention = flash_attention_setting(flash_attention, offload and gpu_layers != 0)
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 999 if gpu_layers < 0 else gpu_layers
        model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        with model_load(amx) as self.model_buffers:
            model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not model:
            raise ArtifactError(f"{self.path}: llama.cpp cannot load this GGUF file (see the llama_cpp log)")
        self._model = model
        self.context_length = context_length or llama_cpp.llama_model_n_ctx_train(model)
        self.threads = threads or physical_cores()
        self.batch_size = batch_size
        self.max_sequences = max_sequences

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_cells or self.context_length
        params.n_batch = params.n_ubatch = batch_size
        params.n_seq_max = max_sequences
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = FLASH_ATTENTION_TYPES[self.flash_attention]
        params.no_perf = True
        context = llama_cpp.llama_init_from_model(model, params)
        if not context:
            llama_cpp.llama_model_free(model)
            raise BackendError(f"{self.path}: llama.cpp cannot create a context of {params.n_ctx} cells (out of memory?)")
        self._context = context
        self.kv_cells = llama_cpp.llama_n_ctx(context)
        self.context_length = min(self.context_length, self.kv_cells)
        self._memory = llama_cpp.llama_get_memory(context)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.hidden_size = llama_cpp.llama_model_n_embd(model)
        self._token_batch = llama_cpp.llama_batch_init(batch_size, 0, 1)
        self._embed_batch = llama_cpp.llama_batch_init(batch_size, self.hidden_size, 1)
        # numpy views of the batches' arrays, so filling one is a few vector copies: [token batch, embedding batch].
        self._views = [self._batch_views(self._token_batch, "token"), self._batch_views(self._embed_batch, "embd")]
        self._free_sequences = list(range(max_sequences))
        self._released: list[int] = []  # sequences of collected caches, cleared at the next use of the context
        self._lock = threading.Lock()  # one context: decodes from several threads must not interleave
        self._finalizer = weakref.finalize(self, _free_native, model, context, self._token_batch, self._embed_batch)
        logger.info("llama.cpp: %s, %d KV cells for %d sequences, %d threads, flash attention %s, weights in %s", self.path.name,
                    self.kv_cells, max_sequences, self.threads, self.flash_attention,
                    ", ".join(f"{name} {mib:.0f} MiB" for name, mib in self.model_buffers.items()))

    def _batch_views(self, batch: llama_cpp.llama_batch, payload: str) -> dict[str, np.ndarray]:
        n = self.batch_size
        views = {name: np.ctypeslib.as_array(getattr(batch, name), shape=(n,)) for name in ("pos", "n_seq_id", "logits")}
        views[payload] = np.ctypeslib.as_array(batch.token, shape=(n,)) if payload == "token" else (
            np.ctypeslib.as_array(batch.embd, shape=(n, self.hidden_size))
        )
        return views

    def new_cache(self) -> "LlamaCppKVCache":
        with self._lock:
            self._check_open()
            self._reclaim()
            if not self._free_sequences:
                raise BackendError(
                    f"all {self.max_sequences} llama.cpp sequences are in use: close a session (or drop it) before opening another"
                )
            sequence = self._free_sequences.pop(0)
        return LlamaCppKVCache(self, sequence)

    def close(self) -> None:
        """Free the model and context now (otherwise when garbage collected, after every cache)."""
        self._finalizer()

    def _release(self, sequence: int) -> None:
        """A cache's finalizer: it may run inside garbage collection at any point (even under the lock, or inside a
        llama.cpp log callback), so it only queues the sequence; `_reclaim` clears it."""
        self._released.append(sequence)

    def _reclaim(self) -> None:
        """Under the lock: empty the KV cells of released sequences and hand them out again."""
        while self._released:
            sequence = self._released.pop()
            llama_cpp.llama_memory_seq_rm(self._memory, sequence, -1, -1)
            self._free_sequences.append(sequence)

    def _truncate(self, sequence: int, length: int) -> None:
        with self._lock:
            self._check_open()
            if not llama_cpp.llama_memory_seq_rm(self._memory, sequence, length, -1):
                raise BackendError(f"llama.cpp cannot truncate sequence {sequence} to {length} tokens")

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise BackendError(f"{self.path.name}: the llama.cpp model is closed")

    def _decode(self, sequence: int, start: int, tokens: list[int] | None, embeds: np.ndarray | None, all_logits: bool) -> np.ndarray:
        """Append tokens or embeddings to `sequence` at position `start`, `batch_size` at a time; the float32 logits
        [count, vocab] with `all_logits`, else [1, vocab] of the last position."""
        count = len(tokens) if tokens is not None else embeds.shape[0]
        batch = self._token_batch if tokens is not None else self._embed_batch
        views = self._views[tokens is None]
        results = []
        with self._lock:
            self._check_open()
            self._reclaim()
            for offset in range(0, count, self.batch_size):
                size = min(self.batch_size, count - offset)
                if tokens is not None:
                    views["token"][:size] = tokens[offset : offset + size]
                else:
                    views["embd"][:size] = embeds[offset : offset + size]
                last_batch = offset + size == count
                views["pos"][:size] = np.arange(start + offset, start + offset + size)
                views["n_seq_id"][:size] = 1
                views["logits"][:size] = all_logits
                views["logits"][size - 1] = all_logits or last_batch
                for i in range(size):
                    batch.seq_id[i][0] = sequence
                batch.n_tokens = size
                status = llama_cpp.llama_decode(self._context, batch)
                if status != 0:
                    llama_cpp.llama_memory_seq_rm(self._memory, sequence, start, -1)  # drop what earlier batches added
                    if status == 1:
                        raise BackendError(
                            f"the llama.cpp KV cache ({self.kv_cells} cells, shared by all open sessions) is full: "
                            "close other sessions or raise kv_cells"
                        )
                    raise BackendError(f"llama_decode failed with status {status}")
                if all_logits:
                    logits = llama_cpp.llama_get_logits(self._context)
                    results.append(np.ctypeslib.as_array(logits, shape=(size, self.vocab_size)).copy())
                elif last_batch:
                    logits = llama_cpp.llama_get_logits_ith(self._context, size - 1)
                    results.append(np.ctypeslib.as_array(logits, shape=(1, self.vocab_size)).copy())
        return np.concatenate(results)


class LlamaCppKVCache:
    """One llama.cpp sequence. Its sequence id returns to the backend on `close()` or when the cache is collected."""

    def __init__(self, backend: LlamaCppLanguageModel, sequence: int):
        self.backend = backend
        self.sequence = sequence
        self.length = 0
        self._finalizer = weakref.finalize(self, backend._release, sequence)

    def append_tokens(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        check_room(self, len(ids), self.backend.context_length)
        return self._append(list(ids), None, all_logits)

    def append_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.ndim != 2 or embeds.shape[1] != self.backend.hidden_size:
            raise ValueError(f"embeddings must be [tokens, {self.backend.hidden_size}], got {list(embeds.shape)}")
        check_room(self, embeds.shape[0], self.backend.context_length)
        return self._append(None, embeds.detach().to("cpu", torch.float32).numpy(), all_logits=False)

    def _append(self, tokens: list[int] | None, embeds: np.ndarray | None, all_logits: bool) -> torch.Tensor:
        self._check_open()
        count = len(tokens) if tokens is not None else embeds.shape[0]
        logits = torch.from_numpy(self.backend._decode(self.sequence, self.length, tokens, embeds, all_logits))
        self.length += count
        return logits if all_logits else logits[-1]

    def truncate(self, length: int) -> None:
        self._check_open()
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        if length < self.length:
            self.backend._truncate(self.sequence, length)
        self.length = length

    def close(self) -> None:
        """Give the sequence back now; the cache cannot be used afterwards."""
        self._finalizer()

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise BackendError("this llama.cpp cache is closed")


def _free_native(model: llama_cpp.llama_model_p, context: llama_cpp.llama_context_p, *batches: llama_cpp.llama_batch) -> None:
    for batch in batches:
        llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(context)
    llama_cpp.llama_model_free(model)
