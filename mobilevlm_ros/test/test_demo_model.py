"""The shipped demo model, served by the node, answers held-out questions of its world right.

Every question goes through the real services with the frame in the request, so what is measured is the whole path a
robot uses: message -> image conversion -> preprocessing -> vision -> LLM -> response. The model is greedy, so these
are deterministic functional checks, not timings; the accuracies are reported with the other figures.

Every kind must beat the best blind guess, the majority answer, and reach the accuracy issue 6 asks for where it
names one (ISSUE_TARGET, reported beside each figure).
"""

import random
from collections import Counter
from collections.abc import Iterator

import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import RegionOfInterest

from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.demo import DEMO_CHECKPOINT
from mobilevlm_ros.demo.world import QUESTION_KINDS, held_out_samples, render, small_object_sample
from mobilevlm_ros.evaluate import is_correct
from ros_harness import Harness, encode

HELD_OUT_SEED = 20261122  # training draws from seeds 0 and 1
SAMPLES = 100
ISSUE_TARGET = {"colour": 0.95, "shape": 0.90, "existence": 0.90, "navigation": 0.90}
SMALL_OBJECT_SAMPLES = 50


@pytest.fixture(scope="module")
def harness(ros_context) -> Iterator[Harness]:
    assert (DEMO_CHECKPOINT / "config.json").is_file(), f"no demo checkpoint in {DEMO_CHECKPOINT}: run `mobilevlm train`"
    with Harness(ros_context, {"model_path": "", "max_new_tokens": 8, "request_timeout_s": 120.0}, "demo_model") as h:
        yield h.activate()


@pytest.mark.parametrize("kind", QUESTION_KINDS + ("navigation",))
def test_the_demo_model_answers_held_out_questions_through_the_node(harness, figures, kind):
    samples = held_out_samples(HELD_OUT_SEED, kind, SAMPLES)
    blind_guess = Counter(sample.answer for _, sample in samples).most_common(1)[0][1]
    right = 0
    for index, (scene, sample) in enumerate(samples):
        image = encode(render(scene), "rgb8", Time(sec=index + 1))
        if kind == "navigation":
            response = harness.call(harness.navigate, NavigationInstruction.Request(instruction=sample.question, image=image))
            answer = response.action
        else:
            response = harness.call(harness.vqa, VisualQuery.Request(question=sample.question, image=image))
            answer = response.answer
        assert response.success, response.error
        right += is_correct(answer, sample.answer)
    figures[f"demo model accuracy: {kind}"] = {"right": right, "samples": SAMPLES, "majority answer": blind_guess,
                                               "issue target": ISSUE_TARGET.get(kind)}
    assert right > blind_guess
    assert right >= ISSUE_TARGET.get(kind, 0) * SAMPLES


def test_a_small_far_object_is_answered_in_crop_mode_where_the_overview_misses_it(harness, figures):
    """A 12-16 px shape in a 1920x1080 frame is 2-3 px in the overview; a region of interest around it brings it to
    the size the model knows. per_tile is reported too (its 640x540 tiles still shrink the shape to ~8 px)."""
    rng = random.Random(HELD_OUT_SEED)
    right = {"overview": 0, "per_tile": 0, "crop": 0}
    for index in range(SMALL_OBJECT_SAMPLES):
        scene, sample, (x, y, width, height) = small_object_sample(rng)
        image = encode(render(scene), "rgb8", Time(sec=index + 1))
        for mode in right:
            roi = RegionOfInterest(x_offset=x, y_offset=y, width=width, height=height) if mode == "crop" else RegionOfInterest()
            response = harness.call(harness.vqa, VisualQuery.Request(question=sample.question, image=image, mode=mode, roi=roi))
            assert response.success, response.error
            right[mode] += is_correct(response.answer, sample.answer)
    figures["demo model, small object in 1920x1080 (colour)"] = right | {"samples": SMALL_OBJECT_SAMPLES}
    assert right["crop"] / SMALL_OBJECT_SAMPLES >= 0.90
    assert right["overview"] / SMALL_OBJECT_SAMPLES <= 0.5
