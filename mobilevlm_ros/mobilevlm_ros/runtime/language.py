"""Language backends: where the LLM's KV state lives and how tokens or embeddings are appended to it.

A backend hands out `KVCache`s, one per token sequence. A cache only ever grows by appending and shrinks by
truncating to an earlier length, which is all that image-prefix reuse, multi-turn history and option scoring need:
a session prefills [system prompt + image] once, then appends a question and truncates back to the prefix.
"""

from typing import Protocol

import torch
from transformers import DynamicCache, LlamaForCausalLM

from mobilevlm_ros.errors import PromptError


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
        positions = torch.arange(self.length, self.length + count, device=inputs_embeds.device).unsqueeze(0)
        output = self.model(
            inputs_embeds=inputs_embeds, position_ids=positions, past_key_values=self.cache, use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        self.length += count
        logits = output.logits[0].float()
        return logits if all_logits else logits[-1]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        self.cache.crop(length - self.length)
        self.length = length


class TorchLanguageModel:
    """transformers' LLaMA: fp32/bf16 on CPU, fp16/bf16 on CUDA."""

    name = "torch"

    def __init__(self, model: LlamaForCausalLM, context_length: int):
        self.model = model
        self.context_length = context_length

    def new_cache(self) -> TorchKVCache:
        return TorchKVCache(self.model, self.context_length)
