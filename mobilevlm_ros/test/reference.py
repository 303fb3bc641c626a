"""Reference computations that tests compare the library with: one uncached forward pass over a whole prompt, with
each image's embeddings spliced in where its placeholder stands (upstream's rule), and what follows from it by brute
force: greedy tokens and the score of every option. Written out here, not taken from the library's cached sessions."""

import torch

from mobilevlm_ros.model.prompt import IMAGE_TOKEN_INDEX
from mobilevlm_ros.runtime.vlm import MobileVLM


@torch.no_grad()
def spliced_logits(vlm: MobileVLM, ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
    """Logits [positions, vocab] of `ids` with the i-th IMAGE_TOKEN_INDEX replaced by the i-th image's embeddings
    (`image_embeds` [num_images, image_tokens, hidden]), in one forward pass without a cache."""
    llm = vlm.language.model  # the torch language backend's LLaMA
    embed = llm.get_input_embeddings()
    images = iter(image_embeds)
    pieces, start = [], 0
    for position, token in enumerate(ids):
        if token == IMAGE_TOKEN_INDEX:
            pieces += [embed(torch.tensor(ids[start:position], dtype=torch.long)), next(images)]
            start = position + 1
    pieces.append(embed(torch.tensor(ids[start:], dtype=torch.long)))
    return llm(inputs_embeds=torch.cat(pieces)[None]).logits[0]


def greedy_tokens(vlm: MobileVLM, ids: list[int], image_embeds: torch.Tensor, steps: int) -> list[int]:
    """Up to `steps` greedy answer tokens after `ids`, each from a pass over everything before it; EOS ends them."""
    tokens: list[int] = []
    for _ in range(steps):
        token = int(spliced_logits(vlm, ids + tokens, image_embeds)[-1].argmax())
        if token == vlm.tokenizer.eos_id:
            break
        tokens.append(token)
    return tokens


def option_scores(vlm: MobileVLM, ids: list[int], image_embeds: torch.Tensor, options: list[str]) -> dict[str, float]:
    """Each option's log-likelihood as the answer after `ids`: its tokens and the EOS that closes it."""
    scores = {}
    for option in options:
        answer = vlm.tokenizer.encode(option) + [vlm.tokenizer.eos_id]
        logits = spliced_logits(vlm, ids + answer, image_embeds)[-len(answer) - 1 : -1]
        scores[option] = float(torch.log_softmax(logits, dim=-1)[torch.arange(len(answer)), answer].sum())
    return scores
