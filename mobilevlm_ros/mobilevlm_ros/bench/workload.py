"""What every benchmark pipeline is given and how its clock readings become figures: the camera frame, the two
questions, and `answer_metrics`. Kept free of torch, so a pipeline that does not use it (llama.cpp's mtmd) does not
carry it in its memory."""

import numpy as np

FIRST_QUESTION = "What is in the image? Describe the scene in detail."
SECOND_QUESTION = "What colour is the largest object?"
TILES_FRAME = (1920, 1080)  # width, height: the high-resolution camera frame `--tiles` cuts


def bench_frame(size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """A camera-sized frame with some structure."""
    image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image[120:360, 200:440] = (200, 40, 40)
    return image


def answer_metrics(
    t0: float, t1: float, t2: float, first: list[float], t3: float, second: list[float], prompt_tokens: int
) -> dict[str, float]:
    """One image -> answer run from its clock readings: start, preprocessed, encoded, the first answer's token times,
    the second question's start and token times."""
    return {
        "preprocess_ms": (t1 - t0) * 1e3,
        "vision_ms": (t2 - t1) * 1e3,
        "prefill_tok_s": prompt_tokens / (first[0] - t2),
        "ttft_s": first[0] - t0,
        "decode_tok_s": (len(first) - 1) / (first[-1] - first[0]),
        "answer_s": first[-1] - t0,
        "second_ttft_s": second[0] - t3,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": len(first),
    }
