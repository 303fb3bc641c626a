"""High-resolution modes on the tiny checkpoint: one batched vision call equal to per-tile calls, the tiled prompt equal
to upstream's splicing of several images, per_tile's merge by confidence, crop, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from mobilevlm_ros.errors import ImageError, PromptError
from mobilevlm_ros.export.onnx import export_onnx
from mobilevlm_ros.model.prompt import IMAGE_TOKEN_INDEX
from mobilevlm_ros.model.tiling import tile_boxes
from mobilevlm_ros.runtime.sampling import SamplingParams
from mobilevlm_ros.runtime.session import PerTileSession
from mobilevlm_ros.runtime.vision import OnnxRuntimeVision
from reference import option_scores
from tiny_checkpoint import CONTEXT_LENGTH, IMAGE_TOKENS

QUESTION = "What is in the image?"
OPTIONS = ["a red square", "a blue square", "nothing"]


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A 700x400 frame (2.5 tile areas at 336: a 2x1 grid with the default budget) with structure in each half."""
    image = np.random.default_rng(5).integers(0, 256, (400, 700, 3), dtype=np.uint8)
    image[50:150, 60:200] = (220, 40, 40)
    image[250:380, 450:600] = (40, 80, 220)
    return image


class CountingVision:
    """The model's vision backend, recording the batch size of every call."""

    def __init__(self, vision):
        self.vision, self.name, self.batches = vision, vision.name, []

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.batches.append(pixel_values.shape[0])
        return self.vision(pixel_values)


def test_tile_size_is_the_towers_from_its_preprocessor(vlm, frame):
    assert vlm.image_processor.crop_size == 336
    views = vlm.views(frame, "tiles")
    assert views.grid == (2, 1) and views.boxes == [None, (0, 0, 350, 400), (350, 0, 700, 400)]
    assert views.image_text == "<image>\n<image> <image>"
    assert [image.size for image in views.images] == [(700, 400), (350, 400), (350, 400)]


def test_overview_and_tiles_go_through_the_vision_backend_in_one_call(vlm, frame, monkeypatch):
    counting = CountingVision(vlm.vision)
    monkeypatch.setattr(vlm, "vision", counting)
    vlm.session(frame, mode="tiles", max_tiles=6)
    vlm.session(frame, mode="per_tile", max_tiles=6)
    vlm.session(frame, mode="crop", roi=(0, 0, 10, 10))
    assert counting.batches == [3, 2, 1]  # overview + 2x1 tiles; the 2 tiles; the crop


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_batched_call_equals_per_tile_calls(vlm, frame, tmp_path, backend):
    vision = vlm.vision
    if backend == "onnxruntime":
        export_onnx(vlm.vision.vision_path, tmp_path / "vision.onnx")
        vision = OnnxRuntimeVision(tmp_path / "vision.onnx", torch.device("cpu"))
    pixels = vlm.image_processor.batch(vlm.views(frame, "tiles", max_tiles=6).images)
    batched = vision(pixels)
    one_by_one = torch.cat([vision(pixels[i : i + 1]) for i in range(len(pixels))])
    assert batched.shape == (3, IMAGE_TOKENS, vlm.config.hidden_size)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[1], batched[2])  # the tiles differ, so the comparison means something


def test_batch_preprocessing_is_the_single_image_preprocessing(vlm, frame):
    images = vlm.views(frame, "tiles").images
    batch = vlm.image_processor.batch(images)
    for index, image in enumerate(images):
        assert torch.equal(batch[index], vlm.image_processor(image))


def test_tiles_session_equals_the_whole_prompt_with_every_image_spliced_in(vlm, frame):
    """The session's cached prefill (text and images appended piece by piece) scores answers as one forward pass over
    upstream's splicing does: the i-th placeholder of the tokenized prompt replaced by the i-th image's embeddings."""
    views = vlm.views(frame, "tiles")
    ids = vlm.prompt_ids(QUESTION, views.image_text)
    assert ids.count(IMAGE_TOKEN_INDEX) == len(views.images) == 3  # the overview and a 2x1 grid
    session = vlm.session(frame, mode="tiles")
    choice = session.choose(QUESTION, OPTIONS)
    assert choice.scores == pytest.approx(option_scores(vlm, ids, vlm.encode_images(views.images), OPTIONS), abs=1e-3)
    assert session.prompt_tokens == len(ids) - len(views.images) + len(views.images) * IMAGE_TOKENS


def test_tiles_answer_differs_from_the_overview_answer(vlm, frame):
    tiles = vlm.session(frame, mode="tiles").choose(QUESTION, OPTIONS)
    overview = vlm.session(frame).choose(QUESTION, OPTIONS)
    assert tiles.scores != pytest.approx(overview.scores)


def test_mean_logprob_is_the_models_probability_of_the_answer(vlm, frame):
    session = vlm.session(frame)
    answer = session.ask(QUESTION, SamplingParams(max_new_tokens=6))
    ids = vlm.prompt_ids(QUESTION)
    generated = list(vlm.session(frame).generate(QUESTION, SamplingParams(max_new_tokens=6)))
    assert answer.generated_tokens == len(generated)
    scored = generated + ([vlm.tokenizer.eos_id] if len(generated) < 6 else [])  # it ended at EOS, or at the limit
    with torch.no_grad():
        llm = vlm.language.model
        embeds = llm.embed_with_images(ids, vlm.encode_image(frame))
        follow = llm.get_input_embeddings()(torch.tensor([generated], dtype=torch.long))
        logits = llm(inputs_embeds=torch.cat([embeds, follow], dim=1)).logits[0, embeds.shape[1] - 1 :]
    logprobs = torch.log_softmax(logits[: len(scored)].float(), dim=-1)[torch.arange(len(scored)), scored]
    assert answer.mean_logprob == pytest.approx(float(logprobs.mean()), abs=1e-4)
    assert answer.mean_logprob < 0


def test_per_tile_keeps_the_most_confident_tiles_answer(vlm):
    frame = np.random.default_rng(8).integers(0, 256, (700, 800, 3), dtype=np.uint8)  # 4.96 tile areas: 2x2 with 4
    params = SamplingParams(max_new_tokens=5)
    session = vlm.session(frame, mode="per_tile", max_tiles=4)
    assert isinstance(session, PerTileSession)
    boxes = tile_boxes((800, 700), (2, 2))
    assert session.boxes == boxes
    each = [vlm.session(Image.fromarray(frame).crop(box)).ask(QUESTION, params) for box in boxes]
    best = max(range(len(each)), key=lambda i: each[i].mean_logprob)
    assert len({answer.mean_logprob for answer in each}) == len(each)
    seen = []
    answer = session.ask(QUESTION, params, on_text=lambda text, tokens: seen.append(text))
    assert (answer.text, answer.box, answer.mean_logprob) == (each[best].text, boxes[best], each[best].mean_logprob)
    assert seen == ([answer.text] if answer.text else [])
    assert vlm.ask(frame, QUESTION, max_new_tokens=5, mode="per_tile", max_tiles=4) == answer.text


def test_per_tile_of_a_frame_that_fits_one_view_is_the_overview(vlm):
    small = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    assert vlm.ask(small, QUESTION, max_new_tokens=5, mode="per_tile") == vlm.ask(small, QUESTION, max_new_tokens=5)
    assert vlm.ask(small, QUESTION, max_new_tokens=5, mode="tiles") == vlm.ask(small, QUESTION, max_new_tokens=5)


def test_crop_asks_about_the_region_at_full_resolution(vlm, frame):
    roi = (450, 250, 150, 130)
    cropped = frame[250:380, 450:600].copy()
    assert vlm.ask(frame, QUESTION, max_new_tokens=6, mode="crop", roi=roi) == vlm.ask(cropped, QUESTION, max_new_tokens=6)
    pixels = vlm.image_processor.batch(vlm.views(frame, "crop", roi).images)
    assert torch.equal(pixels[0], vlm.image_processor(cropped))


def test_bgr_frames_are_tiled_like_rgb(vlm, frame):
    bgr = np.ascontiguousarray(frame[:, :, ::-1])
    assert (vlm.ask(bgr, QUESTION, max_new_tokens=4, channel_order="bgr", mode="tiles")
            == vlm.ask(frame, QUESTION, max_new_tokens=4, mode="tiles"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(mode="zoom"), PromptError, "unknown image mode 'zoom' (expected overview, tiles, per_tile, crop)"),
    (dict(mode="crop"), PromptError, "mode crop needs a region of interest"),
    (dict(mode="overview", roi=(0, 0, 10, 10)), PromptError, "a region of interest is only used by mode crop, not overview"),
    (dict(mode="crop", roi=(650, 0, 100, 10)), ImageError,
     "region of interest (x=650, y=0, width=100, height=10) reaches outside the 700x400 frame"),
    (dict(mode="crop", roi=(0, 0, 0, 0)), ImageError, "is empty"),
    (dict(mode="tiles", max_tiles=0), ImageError, "max_tiles must be at least 1, got 0"),
])
def test_bad_modes_and_regions_are_clear_errors(vlm, frame, kwargs, error, message):
    with pytest.raises(error) as raised:
        vlm.ask(frame, QUESTION, **kwargs)
    assert message in str(raised.value)


def test_too_many_tiles_for_the_context_is_a_clear_error(vlm):
    large = np.zeros((1080, 1920, 3), dtype=np.uint8)
    with pytest.raises(PromptError, match=f"the context holds {CONTEXT_LENGTH}"):
        vlm.session(large, mode="tiles", max_tiles=6)  # 7 x IMAGE_TOKENS image tokens and the text do not fit
    with pytest.raises(PromptError, match="keeps no history"):
        vlm.session(large, mode="per_tile", keep_history=True)
