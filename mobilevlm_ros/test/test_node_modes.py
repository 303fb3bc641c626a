"""mobilevlm_node's image modes through real messages: VisualQuery and Ask with `mode` and `roi`, the `image_mode`
and `max_tiles` parameters, and clear errors for a bad mode or region (the node keeps serving)."""

from collections.abc import Iterator

import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.lifecycle import TransitionCallbackReturn
from sensor_msgs.msg import RegionOfInterest

from mobilevlm_interfaces.action import Ask
from mobilevlm_interfaces.srv import NavigationInstruction, VisualQuery
from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS, navigation_question
from mobilevlm_ros.runtime.sampling import SamplingParams
from ros_harness import MAX_NEW_TOKENS, Harness, encode, node_parameters, stamp
from tiny_checkpoint import IMAGE_TOKENS

QUESTION = "What is in the image?"
# 700x400: 2.5 tile areas of 336x336, so tiles and per_tile cut it 2x1.
FRAME = np.random.default_rng(21).integers(0, 256, (400, 700, 3), dtype=np.uint8)
FRAME[50:150, 60:200] = (220, 40, 40)
FRAME[250:380, 450:600] = (40, 80, 220)
ROI = (450, 250, 150, 130)


def region(x: int, y: int, width: int, height: int) -> RegionOfInterest:
    return RegionOfInterest(x_offset=x, y_offset=y, width=width, height=height)


@pytest.fixture(scope="module")
def harness(ros_context, checkpoint) -> Iterator[Harness]:
    with Harness(ros_context, node_parameters(checkpoint), "modes") as h:
        h.activate()
        h.publish_frame(encode(FRAME, "rgb8", stamp(1)))
        yield h


@pytest.mark.parametrize("mode, roi", [("overview", None), ("tiles", None), ("per_tile", None), ("crop", ROI)])
def test_vqa_answers_in_each_mode_as_the_library_does(harness, vlm, mode, roi):
    request = VisualQuery.Request(question=QUESTION, mode=mode, roi=region(*roi) if roi else RegionOfInterest())
    response = harness.call(harness.vqa, request)
    assert response.success, response.error
    assert response.answer == vlm.ask(FRAME, QUESTION, max_new_tokens=MAX_NEW_TOKENS, mode=mode, roi=roi)
    assert response.prompt_tokens == vlm.session(FRAME, mode=mode, roi=roi).ask(QUESTION, SamplingParams(max_new_tokens=1)).prompt_tokens
    assert response.prompt_tokens > (3 * IMAGE_TOKENS if mode == "tiles" else IMAGE_TOKENS)  # tiles: overview and 2 tiles


def test_empty_mode_is_the_default_and_a_roi_alone_means_crop(harness, vlm):
    plain = harness.call(harness.vqa, VisualQuery.Request(question=QUESTION))
    assert plain.success and plain.answer == vlm.ask(FRAME, QUESTION, max_new_tokens=MAX_NEW_TOKENS)
    cropped = harness.call(harness.vqa, VisualQuery.Request(question=QUESTION, roi=region(*ROI)))
    assert cropped.success, cropped.error
    assert cropped.answer == vlm.ask(FRAME[250:380, 450:600].copy(), QUESTION, max_new_tokens=MAX_NEW_TOKENS)


@pytest.mark.parametrize("fields, error", [
    (dict(mode="zoom"), "unknown image mode 'zoom' (expected overview, tiles, per_tile, crop)"),
    (dict(mode="crop"), "mode crop needs a region of interest"),
    (dict(mode="tiles", roi=region(0, 0, 10, 10)), "a region of interest is only used by mode crop, not tiles"),
    (dict(roi=region(600, 300, 101, 50)), "region of interest (x=600, y=300, width=101, height=50) reaches outside the 700x400 frame"),
    (dict(roi=region(10, 10, 0, 50)), "region of interest (x=10, y=10, width=0, height=50) is empty"),
])
def test_bad_mode_or_roi_is_a_clear_error_and_the_node_keeps_serving(harness, fields, error):
    response = harness.call(harness.vqa, VisualQuery.Request(question=QUESTION, **fields))
    assert not response.success
    assert response.error == error
    assert harness.call(harness.vqa, VisualQuery.Request(question=QUESTION, mode="tiles")).success


def test_ask_action_takes_mode_and_roi(harness, vlm):
    client = ActionClient(harness.client, Ask, harness.name("ask"))
    try:
        feedback: list[str] = []
        goal = Ask.Goal(question=QUESTION, max_new_tokens=MAX_NEW_TOKENS, mode="crop", roi=region(*ROI))
        handle = harness.send_ask_goal(client, goal, feedback)
        result = harness.ask_result(handle)
        assert result.status == GoalStatus.STATUS_SUCCEEDED, result.result.error
        assert result.result.answer == vlm.ask(FRAME, QUESTION, max_new_tokens=MAX_NEW_TOKENS, mode="crop", roi=ROI)
    finally:
        client.destroy()


def test_image_mode_and_max_tiles_parameters_set_the_default(ros_context, checkpoint, vlm):
    with Harness(ros_context, node_parameters(checkpoint, image_mode="per_tile", max_tiles=2), "per_tile_default") as h:
        h.activate()
        h.publish_frame(encode(FRAME, "rgb8", stamp(2)))
        response = h.call(h.vqa, VisualQuery.Request(question=QUESTION))
        assert response.success, response.error
        assert response.answer == vlm.ask(FRAME, QUESTION, max_new_tokens=MAX_NEW_TOKENS, mode="per_tile", max_tiles=2)
        tiles = h.call(h.vqa, VisualQuery.Request(question=QUESTION, mode="tiles"))
        assert tiles.success and tiles.answer == vlm.ask(FRAME, QUESTION, max_new_tokens=MAX_NEW_TOKENS, mode="tiles", max_tiles=2)
        navigation = h.call(h.navigate, NavigationInstruction.Request(instruction="Go to the red door."))
        assert navigation.success, navigation.error  # navigation always sees the overview
        expected = vlm.session(FRAME).choose(navigation_question("Go to the red door.", list(NAVIGATION_ACTIONS)), list(NAVIGATION_ACTIONS))
        assert navigation.action == expected.option


def test_image_mode_parameter_must_be_a_whole_frame_mode(ros_context, checkpoint):
    with Harness(ros_context, node_parameters(checkpoint, image_mode="crop"), "bad_mode") as h:
        assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert h.node.configure_error == "parameter image_mode: 'crop' is not one of overview, tiles, per_tile"
