"""mpp.caption: BLIP and Florence-2 captioners with tiny random weights, saved and loaded from a folder."""

import numpy as np
import pytest

from mpp.caption import (
    BlipCaptioner,
    FlorenceCaptioner,
    crop_with_margin,
    florence_region_prompt,
    load_captioner,
)
from tests.helpers import save_tiny_blip, save_tiny_florence2

BOXES = [[0, 0, 20, 20], [10, 5, 64, 48], [30.5, 10.2, 50.9, 40.1]]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory):
    return save_tiny_florence2(tmp_path_factory.mktemp("florence2"))


@pytest.fixture()
def image():
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_blip_captions_the_frame_and_each_box_crop(blip_dir, image):
    captioner = load_captioner("blip", blip_dir, max_new_tokens=6, num_beams=1, batch_size=2, crop_margin=0.2)
    assert isinstance(captioner, BlipCaptioner)
    scene = captioner.caption(image)
    assert isinstance(scene, str) and scene and scene == captioner.caption(image)
    regions = captioner.caption_regions(image, BOXES)
    assert len(regions) == 3 and all(isinstance(c, str) and c for c in regions)
    # each instance caption is the caption of its crop with the margin (batched in twos or alone)
    assert regions == [captioner.caption(np.ascontiguousarray(crop_with_margin(image, b, 0.2))) for b in BOXES]
    assert captioner.caption_regions(image, []) == []


def test_florence2_captions_with_its_task_prompts(florence_dir, image):
    captioner = load_captioner("florence2", florence_dir, max_new_tokens=4, num_beams=2)
    assert isinstance(captioner, FlorenceCaptioner)
    assert isinstance(captioner.caption(image), str)
    regions = captioner.caption_regions(image, BOXES)
    assert len(regions) == 3 and all(isinstance(c, str) and "<loc_" not in c for c in regions)
    # the box reaches the model as four of Florence's location tokens, after the task's question
    prompt = florence_region_prompt(BOXES[1], 64, 48)
    assert prompt == "<REGION_TO_DESCRIPTION><loc_156><loc_104><loc_999><loc_999>"
    ids = captioner.processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0]
    tokens = captioner.processor.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[-9:] == ["the", "region", "<loc_156>", "<loc_104>", "<loc_999>", "<loc_999>", "describe", "?",
                           "</s>"]


def test_crop_with_margin_is_clipped_and_never_empty(image):
    assert crop_with_margin(image, (10, 10, 20, 30), 0.5).shape == (40, 20, 3)  # y 0..40, x 5..25
    assert crop_with_margin(image, (0, 0, 64, 48), 0.1).shape == image.shape
    assert crop_with_margin(image, (63.5, 47.5, 63.9, 47.9), 0.0).shape == (1, 1, 3)


def test_settings_and_inputs_are_checked_by_flag(blip_dir, image):
    with pytest.raises(ValueError, match=r"--captioner must be one of \['blip', 'florence2'\], got 'gpt'"):
        load_captioner("gpt", blip_dir)
    with pytest.raises(ValueError, match="--captioner.max_new_tokens must be a whole number >= 1, got 0"):
        load_captioner("blip", blip_dir, max_new_tokens=0)
    with pytest.raises(ValueError, match="--annotate.captioner.crop_margin must lie in"):
        load_captioner("blip", blip_dir, crop_margin=2.0, flag="annotate.captioner")
    with pytest.raises(ValueError, match="--captioner.dtype must be one of"):
        load_captioner("blip", blip_dir, dtype="float8")
    captioner = load_captioner("blip", blip_dir, max_new_tokens=2, num_beams=1)
    with pytest.raises(ValueError, match=r"box 1 \[30.0, 10.0, 70.0, 20.0\] lies outside the 64×48 image"):
        captioner.caption_regions(image, [[0, 0, 5, 5], [30, 10, 70, 20]])
    with pytest.raises(ValueError, match="box 0 .* has no area"):
        captioner.caption_regions(image, [[5, 5, 5, 9]])
    with pytest.raises(ValueError, match="H×W×3 uint8 image, got a float64 array"):
        captioner.caption(image.astype(float))


@pytest.mark.parametrize("kind", ["blip", "florence2"])
def test_a_missing_model_is_three_lines_naming_the_flag(tmp_path, kind):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        load_captioner(kind, str(tmp_path / "empty"))
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("captioner.model: cannot load the ")
    assert "does not hold it" in lines[0] and "--captioner.model=/path/to/folder" in lines[2]
