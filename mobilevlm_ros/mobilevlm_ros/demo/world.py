"""A deterministic synthetic world for the demo model: scenes of 1-4 flat shapes, and questions about them.

Every scene and question is a function of a seed, so a training set and a held-out set are two seeds. Positions and
sizes keep a margin from every decision boundary (left / centre / right, near / far), so each answer is unambiguous.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mobilevlm_ros.runtime.navigation import NAVIGATION_ACTIONS, navigation_question

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
BACKGROUNDS = ((200, 200, 200), (225, 215, 190), (190, 205, 215), (160, 160, 150), (235, 235, 228), (205, 190, 175))
FRAME_SIZES = ((336, 336), (320, 240), (400, 300), (480, 360), (640, 480), (640, 360), (300, 400))
POSITIONS = ("left", "centre", "right")
CENTRE_BAND = (0.38, 0.62)  # horizontal centre, as a fraction of the width: left of it "left", right of it "right"
BOUNDARY_MARGIN = 0.04  # no shape centre this close to a band edge
SIZE_RANGE = (0.12, 0.28)  # a shape's side, as a fraction of the frame's short side
NEAR_RANGE = (0.45, 0.58)  # a shape this large is close enough to stop at
CAPTION_QUESTION = "Describe the image briefly."
QUESTION_KINDS = ("colour", "shape", "count", "position", "existence")
EXISTENCE_QUESTIONS = ("Is there a {n}?", "Is there a {n} in the image?", "Do you see a {n}?")  # {n}: "<colour> <kind>"
NAVIGATION_INSTRUCTIONS = ("Go to the {n}.", "Navigate to the {n}.", "Drive to the {n}.", "Move towards the {n}.")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # centre, pixels
    y: float
    size: float  # side of the bounding box, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    texture_seed: int

    def position(self, shape: Shape) -> str:
        """left, centre or right: where `shape` stands across the frame."""
        fraction = shape.x / self.width
        return "left" if fraction < CENTRE_BAND[0] else "right" if fraction > CENTRE_BAND[1] else "centre"

    def is_near(self, shape: Shape) -> bool:
        return shape.size >= NEAR_RANGE[0] * min(self.width, self.height)

    def find(self, colour: str, kind: str) -> Shape | None:
        return next((s for s in self.shapes if s.colour == colour and s.kind == kind), None)


@dataclass(frozen=True)
class Sample:
    """One question about a scene with its answer; `kind` is caption, a QUESTION_KINDS entry or navigation."""

    kind: str
    question: str  # for navigation: the instruction (the model is asked navigation_question(instruction, actions))
    answer: str


def _fraction_ok(fraction: float) -> bool:
    return all(abs(fraction - edge) >= BOUNDARY_MARGIN for edge in CENTRE_BAND)


def _place(
    rng: random.Random, width: int, height: int, size: float, placed: list[Shape], x_range: tuple[float, float]
) -> tuple[float, float] | None:
    """A centre for a shape of `size` inside the frame and `x_range` (fractions), clear of `placed`; None if none found."""
    half = size / 2
    low, high = max(x_range[0] * width, half + 2), min(x_range[1] * width, width - half - 2)
    if low >= high or height - half - 2 <= half + 2:
        return None
    for _ in range(50):
        x, y = rng.uniform(low, high), rng.uniform(half + 2, height - half - 2)
        if not _fraction_ok(x / width):
            continue
        if all(abs(x - s.x) > (size + s.size) / 2 + 4 or abs(y - s.y) > (size + s.size) / 2 + 4 for s in placed):
            return x, y
    return None


def random_scene(
    rng: random.Random,
    count: int | None = None,
    frame: tuple[int, int] | None = None,
    near: Shape | None = None,
    x_range: tuple[float, float] = (0.0, 1.0),
    first: tuple[str, str] | None = None,
) -> Scene:
    """1-4 shapes (`count`), distinct in colour+kind, none overlapping. `first` = (colour, kind) of the first shape,
    placed within `x_range` and, with `near`, as large as a close object."""
    width, height = frame or rng.choice(FRAME_SIZES)
    short = min(width, height)
    count = count or rng.randint(1, 4)
    while True:
        placed: list[Shape] = []
        pairs = set()
        if first is not None:
            pairs.add(first)
        for index in range(count):
            if index == 0 and first is not None:
                colour, kind = first
            else:
                colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                while (colour, kind) in pairs:
                    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                pairs.add((colour, kind))
            large = index == 0 and near is not None
            size = rng.uniform(*(NEAR_RANGE if large else SIZE_RANGE)) * short
            centre = _place(rng, width, height, size, placed, x_range if index == 0 else (0.0, 1.0))
            if centre is None:
                break
            placed.append(Shape(kind, colour, centre[0], centre[1], size))
        if len(placed) == count:
            return Scene(width, height, rng.choice(BACKGROUNDS), tuple(placed), rng.randrange(2**31))


def render(scene: Scene) -> np.ndarray:
    """The scene as an HxWx3 uint8 RGB frame: a textured background with a floor line, then the shapes."""
    noise = np.random.default_rng(scene.texture_seed)
    base = np.empty((scene.height, scene.width, 3), dtype=np.float32)
    base[:] = scene.background
    horizon = int(scene.height * noise.uniform(0.25, 0.45))
    base[horizon:] *= 0.9  # the floor is a little darker than the wall
    base += noise.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        draw_shape(draw, shape, COLOURS[shape.colour])
    return np.asarray(image)


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: int | tuple[int, int, int]) -> None:
    half = shape.size / 2
    box = (shape.x - half, shape.y - half, shape.x + half, shape.y + half)
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(shape.x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)


def caption(scene: Scene) -> str:
    """The shapes from left to right, with where each stands."""
    parts = [f"a {s.name} on the {scene.position(s)}" if scene.position(s) != "centre" else f"a {s.name} in the centre"
             for s in sorted(scene.shapes, key=lambda s: s.x)]
    text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return text[0].upper() + text[1:] + "."


def question(rng: random.Random, scene: Scene, kind: str) -> Sample | None:
    """A question of `kind` about `scene` with its one-word answer; None when the scene cannot pose it unambiguously."""
    shapes = scene.shapes
    if kind == "colour":
        unique = [s for s in shapes if sum(o.kind == s.kind for o in shapes) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        text = rng.choice(("What colour is the {k}?", "What is the colour of the {k}?", "Which colour does the {k} have?"))
        return Sample(kind, text.format(k=shape.kind), shape.colour)
    if kind == "shape":
        unique = [s for s in shapes if sum(o.colour == s.colour for o in shapes) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        text = rng.choice(("What shape is the {c} object?", "What is the shape of the {c} object?", "Which shape is {c}?"))
        return Sample(kind, text.format(c=shape.colour), shape.kind)
    if kind == "count":
        text = rng.choice(("How many shapes are there?", "How many objects are in the image?", "Count the shapes."))
        return Sample(kind, text, str(len(shapes)))
    if kind == "position":
        shape = rng.choice(shapes)
        text = rng.choice(("Where is the {n}?", "Is the {n} on the left, in the centre or on the right?"))
        return Sample(kind, text.format(n=shape.name), scene.position(shape))
    if kind == "existence":
        if rng.random() < 0.5:
            shape = rng.choice(shapes)
            colour, kind_ = shape.colour, shape.kind
            answer = "yes"
        else:  # POPE's adversarial negatives: a present colour with another shape, or a present shape in another colour
            shape = rng.choice(shapes)
            for _ in range(20):
                colour, kind_ = (shape.colour, rng.choice(SHAPES)) if rng.random() < 0.5 else (rng.choice(list(COLOURS)), shape.kind)
                if scene.find(colour, kind_) is None:
                    break
            else:
                return None
            answer = "no"
        text = rng.choice(EXISTENCE_QUESTIONS)
        return Sample("existence", text.format(n=f"{colour} {kind_}"), answer)
    raise ValueError(f"unknown question kind {kind!r}")


def random_negative(rng: random.Random, scene: Scene) -> Sample:
    """An existence question about an absent object drawn at random (POPE's "random" negatives; `question` draws the
    adversarial ones): one sharing neither colour nor shape with the scene when there is one."""
    colours, kinds = {s.colour for s in scene.shapes}, {s.kind for s in scene.shapes}
    absent = [(c, k) for c in COLOURS for k in SHAPES if scene.find(c, k) is None]
    unrelated = [(c, k) for c, k in absent if c not in colours and k not in kinds]
    colour, kind = rng.choice(unrelated or absent)
    text = rng.choice(EXISTENCE_QUESTIONS)
    return Sample("existence", text.format(n=f"{colour} {kind}"), "no")


def navigation_answer(scene: Scene, colour: str, kind: str) -> str:
    """Turn towards the target, go forward when it is ahead, stop when it is close or not in view."""
    target = scene.find(colour, kind)
    if target is None or scene.is_near(target):
        return "stop"
    return {"left": "turn_left", "right": "turn_right", "centre": "move_forward"}[scene.position(target)]


def navigation_sample(rng: random.Random) -> tuple[Scene, Sample]:
    """A scene and an instruction, the expected action drawn evenly (stop: half near, half absent)."""
    action = rng.choice(NAVIGATION_ACTIONS)
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    absent = action == "stop" and rng.random() < 0.5
    if absent:
        scene = random_scene(rng)
        while scene.find(colour, kind) is not None:
            colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    else:
        x_range = {"turn_left": (0.0, CENTRE_BAND[0]), "turn_right": (CENTRE_BAND[1], 1.0)}.get(action, CENTRE_BAND)
        near = Shape(kind, colour, 0, 0, 0) if action == "stop" else None
        scene = random_scene(rng, count=rng.randint(1, 2 if near else 4), near=near, x_range=x_range, first=(colour, kind))
    instruction = rng.choice(NAVIGATION_INSTRUCTIONS)
    sample = Sample("navigation", instruction.format(n=f"{colour} {kind}"), navigation_answer(scene, colour, kind))
    return scene, sample


HIGH_RESOLUTION = (1920, 1080)
SMALL_SIZE_PX = (12, 16)  # a far object: a few pixels once the whole frame is shrunk to the tower's 336x336
SMALL_ROI_PX = 64  # side of the region of interest around it (a detector's box with context)


def small_object_sample(rng: random.Random) -> tuple[Scene, Sample, tuple[int, int, int, int]]:
    """A HIGH_RESOLUTION scene of one small shape, a colour question about it, and a region of interest
    (x, y, width, height) of SMALL_ROI_PX that holds the shape somewhere inside (not always centred)."""
    width, height = HIGH_RESOLUTION
    size = rng.uniform(*SMALL_SIZE_PX)
    x, y = rng.uniform(SMALL_ROI_PX, width - SMALL_ROI_PX), rng.uniform(SMALL_ROI_PX, height - SMALL_ROI_PX)
    shape = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), x, y, size)
    scene = Scene(width, height, rng.choice(BACKGROUNDS), (shape,), rng.randrange(2**31))
    slack = (SMALL_ROI_PX - size) / 2 - 2  # how far the box may shift with the shape still inside it
    left = round(x - SMALL_ROI_PX / 2 + rng.uniform(-slack, slack))
    top = round(y - SMALL_ROI_PX / 2 + rng.uniform(-slack, slack))
    return scene, question(rng, scene, "colour"), (left, top, SMALL_ROI_PX, SMALL_ROI_PX)


def prompt_question(sample: Sample) -> str:
    """What the model is asked for `sample` (navigation instructions are wrapped in the navigation prompt)."""
    return navigation_question(sample.question, NAVIGATION_ACTIONS) if sample.kind == "navigation" else sample.question


def held_out_samples(seed: int, kind: str, count: int) -> list[tuple[Scene, Sample]]:
    """`count` (scene, sample) pairs of one kind (a QUESTION_KINDS entry or navigation), each pair from its own scene."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        if kind == "navigation":
            pairs.append(navigation_sample(rng))
            continue
        scene = random_scene(rng)
        if (sample := question(rng, scene, kind)) is not None:
            pairs.append((scene, sample))
    return pairs


def write_eval_set(directory: Path, seed: int, count_per_kind: int, kinds: tuple[str, ...] = QUESTION_KINDS) -> Path:
    """PNG frames and a questions.jsonl ({"image", "question", "answer", "kind"} per line) for `mobilevlm eval`."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for kind in kinds:
        for index, (scene, sample) in enumerate(held_out_samples(seed, kind, count_per_kind)):
            name = f"{kind}-{index:04d}.png"
            Image.fromarray(render(scene)).save(images / name)
            lines.append(json.dumps({"image": name, "question": prompt_question(sample), "answer": sample.answer, "kind": kind}))
    path = directory / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
