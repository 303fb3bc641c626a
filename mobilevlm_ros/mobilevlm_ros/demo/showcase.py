"""`mobilevlm demo`: the demo model answering questions about synthetic scenes, without ROS.

Each scene gets one question of each kind and a navigation instruction; the answers are printed beside what the
world says is right, and each frame is saved with its question and answer drawn on it.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mobilevlm_ros.demo.world import QUESTION_KINDS, Sample, held_out_samples, render
from mobilevlm_ros.evaluate import is_correct
from mobilevlm_ros.ros.debug_image import draw_caption
from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS, navigation_question
from mobilevlm_ros.runtime.vlm import MobileVLM

logger = logging.getLogger(__name__)

DEMO_SEED = 2024  # the demo's scenes; training uses other seeds


@dataclass(frozen=True)
class DemoAnswer:
    sample: Sample
    answer: str
    latency_s: float

    @property
    def correct(self) -> bool:
        return is_correct(self.answer, self.sample.answer)


def demo_samples(per_kind: int, seed: int = DEMO_SEED) -> list[tuple[np.ndarray, Sample]]:
    """`per_kind` frames for each question kind and for navigation, rendered."""
    kinds = QUESTION_KINDS + ("navigation",)
    return [(render(scene), sample) for index, kind in enumerate(kinds) for scene, sample in held_out_samples(seed + index, kind, per_kind)]


def answer_sample(vlm: MobileVLM, frame: np.ndarray, sample: Sample) -> DemoAnswer:
    started = time.perf_counter()
    if sample.kind == "navigation":
        session = vlm.session(frame)
        answer = session.choose(navigation_question(sample.question, NAVIGATION_ACTIONS), list(NAVIGATION_ACTIONS)).option
    else:
        answer = vlm.ask(frame, sample.question, max_new_tokens=8)
    return DemoAnswer(sample, answer, time.perf_counter() - started)


def save_debug_image(frame: np.ndarray, result: DemoAnswer, path: Path) -> None:
    lines = [f"Q: {result.sample.question}", f"A: {result.answer} (expected {result.sample.answer})"]
    Image.fromarray(draw_caption(frame, lines)).save(path)


def run_demo(model: str | Path, out_dir: str | Path, per_kind: int = 2) -> list[DemoAnswer]:
    """Answer the demo's questions with the model in `model`; debug images go to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vlm = MobileVLM.from_pretrained(model, device="cpu")
    results = []
    for index, (frame, sample) in enumerate(demo_samples(per_kind)):
        result = answer_sample(vlm, frame, sample)
        save_debug_image(frame, result, out_dir / f"{index:02d}-{sample.kind}.png")
        results.append(result)
    return results
