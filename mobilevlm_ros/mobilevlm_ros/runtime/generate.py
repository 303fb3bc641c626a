"""Token generation with the transformers LLaMA: prefill the prompt embeddings once, then decode one token a step."""

from collections.abc import Iterator

import torch
from transformers import DynamicCache, LlamaForCausalLM

from mobilevlm_ros.runtime.sampling import SamplingParams, sample_token


@torch.inference_mode()
def generate_tokens(
    model: LlamaForCausalLM, inputs_embeds: torch.Tensor, eos_id: int, params: SamplingParams, max_length: int
) -> Iterator[int]:
    """Yield new token ids until EOS (not yielded), `params.max_new_tokens`, or `max_length` tokens in the context."""
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=inputs_embeds.device).manual_seed(params.seed)
    cache = DynamicCache()
    length = inputs_embeds.shape[1]
    logits = model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    for step in range(params.max_new_tokens):
        token = sample_token(logits, params.temperature, generator)
        if token == eos_id:
            return
        yield token
        if step + 1 == params.max_new_tokens or length == max_length:
            return
        input_ids = torch.tensor([[token]], device=inputs_embeds.device)
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0, -1]
        length += 1
