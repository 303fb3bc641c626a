"""The synthetic world: seeded, rendered as described, and every answer follows from the scene's geometry."""

import random
import re

import numpy as np
import pytest

from mobilevlm_ros.demo.world import (
    CENTRE_BAND,
    COLOURS,
    NEAR_RANGE,
    QUESTION_KINDS,
    SHAPES,
    Scene,
    Shape,
    caption,
    held_out_samples,
    navigation_answer,
    navigation_sample,
    question,
    random_negative,
    random_scene,
    render,
    write_eval_set,
)
from mobilevlm_ros.evaluate import read_questions


def test_scenes_and_frames_are_a_function_of_the_seed():
    first = [random_scene(random.Random(5)) for _ in range(3)]
    again = [random_scene(random.Random(5)) for _ in range(3)]
    assert first == again
    assert all(np.array_equal(render(a), render(b)) for a, b in zip(first, again, strict=True))
    assert random_scene(random.Random(6)) != first[0]


def test_shapes_are_drawn_in_their_colour_where_the_scene_says():
    rng = random.Random(1)
    for _ in range(20):
        scene = random_scene(rng)
        frame = render(scene)
        assert frame.shape == (scene.height, scene.width, 3) and frame.dtype == np.uint8
        for shape in scene.shapes:
            # below the centre, inside every kind (a triangle's apex is at the top)
            x, y = round(shape.x), round(shape.y + shape.size / 6)
            assert tuple(frame[y, x]) == COLOURS[shape.colour], shape


def test_scenes_keep_shapes_apart_inside_the_frame_and_off_the_decision_boundaries():
    rng = random.Random(2)
    for _ in range(200):
        scene = random_scene(rng)
        assert 1 <= len(scene.shapes) <= 4
        assert len({(s.colour, s.kind) for s in scene.shapes}) == len(scene.shapes)
        for shape in scene.shapes:
            assert shape.size / 2 <= shape.x <= scene.width - shape.size / 2
            assert shape.size / 2 <= shape.y <= scene.height - shape.size / 2
            assert all(abs(shape.x / scene.width - edge) >= 0.04 for edge in CENTRE_BAND)
        for a in scene.shapes:
            for b in scene.shapes:
                if a is not b:
                    apart = abs(a.x - b.x) > (a.size + b.size) / 2 or abs(a.y - b.y) > (a.size + b.size) / 2
                    assert apart, (a, b)


def test_positions_and_navigation_follow_the_target():
    scene = Scene(600, 400, (200, 200, 200), (
        Shape("circle", "red", 60, 200, 60), Shape("square", "blue", 300, 200, 60),
        Shape("triangle", "green", 540, 200, 60), Shape("circle", "yellow", 300, 200, NEAR_RANGE[0] * 400 + 1),
    ), 0)
    assert [scene.position(s) for s in scene.shapes[:3]] == ["left", "centre", "right"]
    assert navigation_answer(scene, "red", "circle") == "turn_left"
    assert navigation_answer(scene, "blue", "square") == "move_forward"
    assert navigation_answer(scene, "green", "triangle") == "turn_right"
    assert navigation_answer(scene, "yellow", "circle") == "stop"  # close enough
    assert navigation_answer(scene, "purple", "square") == "stop"  # not in view
    assert caption(Scene(600, 400, (0, 0, 0), scene.shapes[:2], 0)) == "A red circle on the left and a blue square in the centre."


@pytest.mark.parametrize("kind", QUESTION_KINDS)
def test_every_question_kind_is_answerable_from_its_scene(kind):
    for scene, sample in held_out_samples(11, kind, 60):
        assert sample.kind == kind
        if kind == "colour":
            kinds = [s.kind for s in scene.shapes]
            target = next(k for k in SHAPES if f"the {k}" in sample.question)
            assert kinds.count(target) == 1 and scene.shapes[kinds.index(target)].colour == sample.answer
        elif kind == "shape":
            colours = [s.colour for s in scene.shapes]
            target = next(c for c in COLOURS if re.search(rf"\b{c}\b", sample.question))
            assert colours.count(target) == 1 and scene.shapes[colours.index(target)].kind == sample.answer
        elif kind == "count":
            assert sample.answer == str(len(scene.shapes))
        elif kind == "position":
            assert sample.answer in ("left", "centre", "right")
        else:
            named = next((c, k) for c in COLOURS for k in SHAPES if f"{c} {k}" in sample.question)
            assert sample.answer == ("yes" if scene.find(*named) else "no")


def test_existence_questions_are_balanced_and_navigation_covers_every_action():
    answers = [s.answer for _, s in held_out_samples(3, "existence", 200)]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    actions = [navigation_sample(random.Random(seed))[1].answer for seed in range(200)]
    assert {"move_forward", "turn_left", "turn_right", "stop"} == set(actions)
    two_circles = Scene(100, 100, (0, 0, 0), (Shape("circle", "red", 50, 50, 20), Shape("circle", "blue", 20, 20, 10)), 0)
    assert question(random.Random(0), two_circles, "colour") is None


def test_random_negatives_name_an_absent_object_unrelated_to_the_scene_when_there_is_one():
    rng = random.Random(5)
    for _ in range(100):
        scene = random_scene(rng)
        sample = random_negative(rng, scene)
        colour, kind = next((c, k) for c in COLOURS for k in SHAPES if f"{c} {k}" in sample.question)
        assert sample.kind == "existence" and sample.answer == "no" and scene.find(colour, kind) is None
        if len({s.kind for s in scene.shapes}) < len(SHAPES):
            assert all(colour != s.colour and kind != s.kind for s in scene.shapes)


def test_an_eval_set_is_written_in_the_eval_format(tmp_path):
    path = write_eval_set(tmp_path, seed=4, count_per_kind=3)
    questions = read_questions(path)
    assert len(questions) == 3 * len(QUESTION_KINDS)
    assert all((tmp_path / "images" / q.image).is_file() for q in questions)
    assert {q.kind for q in questions} == set(QUESTION_KINDS)
