"""Language backends: where the LLM's KV state lives and how tokens or embeddings are appended to it.

A backend hands out `KVCache`s, one per token sequence. A cache only ever grows by appending and shrinks by
truncating to an earlier length, which is all that image-prefix reuse, multi-turn history and option scoring need:
a session prefills [system prompt + image] once, then appends a question and truncates back to the prefix.
"""

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from mobilevlm_ros.errors import ConfigError, PromptError

logger = logging.getLogger(__name__)


class KVCache(Protocol):
    """One sequence's KV state in a backend. Logits come back as float tensors, [vocab] or [n, vocab]."""

    length: int

    def append_tokens(self, ids: list[int], all_logits: bool = False) -> torch.Tensor: ...

    def append_embeds(self, embeds: torch.Tensor) -> torch.Tensor: ...

    def truncate(self, length: int) -> None: ...


class LanguageBackend(Protocol):
    name: str
    context_length: int

    def new_cache(self) -> KVCache: ...


def check_room(cache: KVCache, count: int, context_length: int) -> None:
    """Fail before the forward pass when `count` more tokens would not fit in the context."""
    if cache.length + count > context_length:
        raise PromptError(f"prompt is {cache.length + count} tokens with the image; the context holds {context_length}")


def _forward(model: LlamaForCausalLM, cache: DynamicCache | StaticCache, start: int, inputs_embeds: torch.Tensor,
             all_logits: bool) -> torch.Tensor:
    """Run `inputs_embeds` [1, count, hidden] at positions start.. through the model into `cache`; the float logits of
    every position ([count, vocab]) with `all_logits`, else of the last one ([vocab])."""
    count = inputs_embeds.shape[1]
    positions = torch.arange(start, start + count, device=inputs_embeds.device)
    output = model(
        inputs_embeds=inputs_embeds, position_ids=positions[None], cache_position=positions, past_key_values=cache,
        use_cache=True, logits_to_keep=0 if all_logits else 1,
    )
    logits = output.logits[0].float()
    return logits if all_logits else logits[-1]


class TorchKVCache:
    """A transformers DynamicCache driven one append at a time."""

    def __init__(self, model: LlamaForCausalLM, context_length: int):
        self.model = model
        self.context_length = context_length
        self.cache = DynamicCache()
        self.length = 0

    @torch.inference_mode()
    def append_tokens(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        check_room(self, len(ids), self.context_length)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        logits = _forward(self.model, self.cache, self.length, self.model.get_input_embeddings()(input_ids), all_logits)
        self.length += len(ids)
        return logits

    @torch.inference_mode()
    def append_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        check_room(self, embeds.shape[0], self.context_length)
        logits = _forward(self.model, self.cache, self.length, embeds.to(self.model.device, self.model.dtype).unsqueeze(0), False)
        self.length += embeds.shape[0]
        return logits

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        self.cache.crop(length - self.length)
        self.length = length


@dataclass(frozen=True)
class Segment:
    """One append, as it went into the static buffer: token ids or image embeddings (already on the model's device,
    in its dtype), and whether it ran as the captured decode step. Replaying a log of segments rebuilds a sequence's
    KV entries exactly: each segment runs through the same path, at the same positions, with the same chunking."""

    ids: tuple[int, ...] | None
    embeds: torch.Tensor | None  # [count, hidden]
    graphed: bool = False

    @property
    def length(self) -> int:
        return len(self.ids) if self.ids is not None else self.embeds.shape[0]

    def same_as(self, other: "Segment") -> bool:
        """Whether both left the same KV entries (embeddings compare by identity: no device sync)."""
        if self.graphed != other.graphed:
            return False
        if self.ids is not None:
            return self.ids == other.ids
        return self.embeds is other.embeds

    def head(self, count: int) -> "Segment":
        """The first `count` positions (what a truncate inside this segment keeps)."""
        if self.ids is not None:
            return Segment(self.ids[:count], None, self.graphed)
        return Segment(None, self.embeds[:count], self.graphed)


class SharedStaticCache:
    """A backend's one preallocated StaticCache, lent to all of its TorchStaticKVCaches, and (on CUDA) its one decode
    step captured as a CUDA graph. Every decode step has the same shapes, so the graph is replayed per token without
    per-kernel launch costs; one buffer of the context length serves every session (about 384 MB in fp16 for
    MobileLLaMA-1.4B at 2048 tokens), instead of one per session.

    It holds one sequence at a time: `content` is the log of the cache whose entries it holds (that cache's own list,
    so its appends and truncations keep both in step). A cache that finds another one's entries in the buffer
    replays its own log first, from the first segment where the two differ (the node's worker asks about one frame
    at a time, so this happens only when a caller alternates sessions). The layers write at their `cumulative_length`
    (a device tensor, so the graph can advance it); `position` mirrors it on the host, so it is set only on a jump."""

    def __init__(self, model: LlamaForCausalLM, context_length: int, cache: StaticCache, cuda_graph: bool):
        self.model = model
        self.context_length = context_length
        self.cache = cache
        self.cuda_graph = cuda_graph
        self.content: list[Segment] = []
        self.position = 0
        self.lock = threading.RLock()  # one buffer: appends from several threads must not interleave
        self._graph: torch.cuda.CUDAGraph | None = None

    def activate(self, log: list[Segment], length: int) -> None:
        """Make the buffer hold `log` (a cache's segments, `length` positions) and write at `length` next."""
        if self.content is not log:
            kept, start = 0, 0
            for ours, theirs in zip(log, self.content, strict=False):
                if not ours.same_as(theirs):
                    break
                kept, start = kept + 1, start + ours.length
            self.move_to(start)
            for segment in log[kept:]:
                self.run(segment, all_logits=False)
            self.content = log
        self.move_to(length)

    def move_to(self, length: int) -> None:
        """Set every layer's write position (entries past it are masked by their cache position and overwritten)."""
        if length != self.position:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(length)
            self.position = length

    def run(self, segment: Segment, all_logits: bool) -> torch.Tensor:
        """Append `segment` at the write position; its logits (see `_forward`)."""
        if segment.graphed:
            logits = self._replay(segment.ids[0])
        else:
            embeds = segment.embeds if segment.embeds is not None else self.model.get_input_embeddings()(
                torch.tensor([segment.ids], dtype=torch.long, device=self.model.device))[0]
            logits = _forward(self.model, self.cache, self.position, embeds.unsqueeze(0), all_logits)
        self.position += segment.length
        return logits

    def graphable(self, ids: list[int], all_logits: bool) -> bool:
        """Whether an append of `ids` runs as the captured decode step: one token after a prefill, on CUDA."""
        return self.cuda_graph and len(ids) == 1 and not all_logits and self.position > 0

    def _replay(self, token: int) -> torch.Tensor:
        if self._graph is None:
            self._capture()
        self._token.fill_(token)
        self._position.fill_(self.position)
        self._graph.replay()
        return self._logits[0, -1].float().clone()

    def _decode_step(self) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(self._token)
        return self.model(inputs_embeds=embeds, position_ids=self._position[None], cache_position=self._position,
                          past_key_values=self.cache, use_cache=True).logits

    def _capture(self) -> None:
        """Warm up on a side stream, then record one decode step reading the token and position from static buffers.
        The warm-up writes a throw-away entry at the write position, which the first real step overwrites."""
        device = self.model.device
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._position = torch.full((1,), self.position, dtype=torch.long, device=device)
        position = self.position
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream(device).wait_stream(side)
        self._force_position(position)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._decode_step()
        self._force_position(position)  # undo whatever the warm-up and the capture advanced

    def _force_position(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)
        self.position = length


class TorchStaticKVCache:
    """One sequence in its backend's SharedStaticCache: the log of what was appended, so that the sequence can be
    rebuilt when another cache used the buffer in between. Truncating only shortens the log and moves the write
    position."""

    def __init__(self, shared: SharedStaticCache):
        self.shared = shared
        self.context_length = shared.context_length
        self.log: list[Segment] = []
        self.length = 0

    @torch.inference_mode()
    def append_tokens(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        check_room(self, len(ids), self.context_length)
        with self.shared.lock:
            self.shared.activate(self.log, self.length)
            segment = Segment(tuple(ids), None, graphed=self.shared.graphable(ids, all_logits))
            return self._append(segment, all_logits)

    @torch.inference_mode()
    def append_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        check_room(self, embeds.shape[0], self.context_length)
        with self.shared.lock:
            self.shared.activate(self.log, self.length)
            model = self.shared.model
            return self._append(Segment(None, embeds.to(model.device, model.dtype)), all_logits=False)

    def _append(self, segment: Segment, all_logits: bool) -> torch.Tensor:
        logits = self.shared.run(segment, all_logits)
        self.log.append(segment)
        self.length += segment.length
        return logits

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        with self.shared.lock:
            kept = 0
            for index, segment in enumerate(self.log):
                if kept + segment.length > length:
                    if kept < length:
                        self.log[index] = segment.head(length - kept)
                        index += 1
                    del self.log[index:]
                    break
                kept += segment.length
            self.length = length
            if self.shared.content is self.log:
                self.shared.move_to(length)


class Int8Linear(nn.Module):
    """Weight-only int8 Linear: int8 weights with one scale per output row (symmetric), activations unchanged.
    A quarter of fp32's memory; the matmul is torch's int8-weight kernel (CPU fp32, CUDA fp16/bf16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(flat, self.weight, self.scale.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out


def int8_unavailable_reason(device: torch.device) -> str | None:
    """Why weight-only int8 cannot run on `device`, or None. torch has `_weight_int8pack_mm` kernels for the CPU from
    2.3 and for CUDA only from 2.9 (torch 2.8's native_functions.yaml lists CPU and MPS, 2.9's adds CUDA)."""
    key = device.type.upper()
    try:
        available = torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", key)
    except (AttributeError, RuntimeError):  # the private probe went away: fall back to what releases are known to have
        available = key == "CPU" or (key == "CUDA" and tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 9))
    if available:
        return None
    return (f"torch {torch.__version__} has no {device.type} kernel for int8 weight-only matmuls "
            "(torch._weight_int8pack_mm: CUDA from torch 2.9); use fp16 or bf16, or the llamacpp backend")


def quantize_int8(model: LlamaForCausalLM) -> None:
    """Replace every Linear of the decoder layers and the LM head by an Int8Linear (embeddings and norms stay)."""
    for parent in [*model.base_model.layers.modules(), model]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))


class TorchLanguageModel:
    """transformers' LLaMA: fp32/bf16 on CPU, fp16/bf16 on CUDA; `int8` quantizes the weights (weight-only).

    `static_cache` (the default on CUDA) keeps one preallocated KV buffer of the context length for all sessions,
    allocated on first use, and on CUDA one decode step captured as a CUDA graph (SharedStaticCache); otherwise each
    session grows a DynamicCache of its own. A transformers whose StaticCache layers have no `cumulative_length` (a
    release after the ones this was written against) gets dynamic caches, said once in the log."""

    name = "torch"

    def __init__(self, model: LlamaForCausalLM, context_length: int, static_cache: bool | None = None, int8: bool = False):
        self.model = model
        self.context_length = context_length
        self.static_cache = model.device.type == "cuda" if static_cache is None else static_cache
        self._shared: SharedStaticCache | None = None
        if int8:
            if reason := int8_unavailable_reason(model.device):
                raise ConfigError(f"int8 language model on {model.device}: {reason}")
            quantize_int8(model)

    def new_cache(self) -> "TorchKVCache | TorchStaticKVCache":
        if self.static_cache and (shared := self.shared_static_cache()) is not None:
            return TorchStaticKVCache(shared)
        return TorchKVCache(self.model, self.context_length)

    def shared_static_cache(self) -> SharedStaticCache | None:
        """The backend's one static buffer (made on first use; its memory is allocated at the first prefill), or None
        when this transformers' StaticCache cannot be driven this way (then static_cache turns off)."""
        if self._shared is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.context_length)
            if not all(hasattr(layer, "cumulative_length") for layer in cache.layers):
                import transformers

                logger.warning("transformers %s: StaticCache layers have no cumulative_length; the torch backend decodes "
                               "eagerly with a dynamic KV cache per session (no CUDA graph)", transformers.__version__)
                self.static_cache = False
                return None
            self._shared = SharedStaticCache(self.model, self.context_length, cache, cuda_graph=self.model.device.type == "cuda")
        return self._shared
