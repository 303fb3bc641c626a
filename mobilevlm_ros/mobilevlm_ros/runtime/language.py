"""Language backends: where the LLM's KV state lives and how tokens or embeddings are appended to it.

A backend hands out `KVCache`s, one per token sequence. A cache only ever grows by appending and shrinks by
truncating to an earlier length, which is all that image-prefix reuse, multi-turn history and option scoring need:
a session prefills [system prompt + image] once, then appends a question and truncates back to the prefix.
"""

from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from mobilevlm_ros.errors import ConfigError, PromptError


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
        return self._forward(self.model.get_input_embeddings()(input_ids), all_logits)

    @torch.inference_mode()
    def append_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        check_room(self, embeds.shape[0], self.context_length)
        return self._forward(embeds.to(self.model.device, self.model.dtype).unsqueeze(0), all_logits=False)

    def _forward(self, inputs_embeds: torch.Tensor, all_logits: bool) -> torch.Tensor:
        count = inputs_embeds.shape[1]
        positions = torch.arange(self.length, self.length + count, device=inputs_embeds.device)
        output = self.model(
            inputs_embeds=inputs_embeds, position_ids=positions[None], cache_position=positions, past_key_values=self.cache,
            use_cache=True, logits_to_keep=0 if all_logits else 1,
        )
        self.length += count
        logits = output.logits[0].float()
        return logits if all_logits else logits[-1]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        self.cache.crop(length - self.length)
        self.length = length


class TorchStaticKVCache(TorchKVCache):
    """A preallocated StaticCache, so every decode step has the same shapes; on CUDA that step is captured once as a
    CUDA graph and replayed per token (no per-kernel launch cost). Truncating only moves the length: entries past it
    are masked by their cache position and overwritten by the next append."""

    def __init__(self, model: LlamaForCausalLM, context_length: int, cuda_graph: bool):
        super().__init__(model, context_length)
        self.cache = StaticCache(config=model.config, max_cache_len=context_length)
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None

    @torch.inference_mode()
    def append_tokens(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        if not (self.cuda_graph and len(ids) == 1 and not all_logits and self.length > 0):
            return super().append_tokens(ids, all_logits)
        check_room(self, 1, self.context_length)
        if self._graph is None:
            self._capture()
        self._token.fill_(ids[0])
        self._position.fill_(self.length)
        self._graph.replay()
        self.length += 1
        return self._logits[0, -1].float().clone()

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        self._set_write_position(length)
        self.length = length

    def _set_write_position(self, length: int) -> None:
        """Static layers write at their own counter (a device tensor, so a graph can advance it); move it."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)

    def _decode_step(self) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(self._token)
        return self.model(inputs_embeds=embeds, position_ids=self._position[None], cache_position=self._position,
                          past_key_values=self.cache, use_cache=True).logits

    def _capture(self) -> None:
        """Warm up on a side stream, then record one decode step reading the token and position from static buffers.
        The warm-up writes a throw-away entry at the current position, which the first real step overwrites."""
        device = self.model.device
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._position = torch.full((1,), self.length, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream(device).wait_stream(side)
        self._set_write_position(self.length)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._decode_step()
        self._set_write_position(self.length)  # undo whatever the warm-up and the capture advanced


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
    """transformers' LLaMA: fp32/bf16 on CPU, fp16/bf16 on CUDA; `static_cache` preallocates the KV cache (and on
    CUDA captures the decode step as a CUDA graph); `int8` quantizes the weights (weight-only)."""

    name = "torch"

    def __init__(self, model: LlamaForCausalLM, context_length: int, static_cache: bool | None = None, int8: bool = False):
        self.model = model
        self.context_length = context_length
        self.static_cache = model.device.type == "cuda" if static_cache is None else static_cache
        if int8:
            if reason := int8_unavailable_reason(model.device):
                raise ConfigError(f"int8 language model on {model.device}: {reason}")
            quantize_int8(model)

    def new_cache(self) -> TorchKVCache:
        if self.static_cache:
            return TorchStaticKVCache(self.model, self.context_length, cuda_graph=self.model.device.type == "cuda")
        return TorchKVCache(self.model, self.context_length)
