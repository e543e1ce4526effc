"""mpp.detect: the settings, NMS and the box filters on constructed inputs, and Grounding DINO and OWLv2
loaded through `load_detector` from tiny random models saved offline (tests/helpers.py)."""

import numpy as np
import pytest
import torch

from mpp.detect import (
    DetectSettings,
    Detection,
    GroundingDinoDetector,
    Owlv2Detector,
    finalize,
    load_detector,
    nms,
    pairwise_iou,
)
from mpp.evaluate import box_iou
from tests.helpers import save_tiny_grounding_dino, save_tiny_owlv2

VOCABULARY = ["a teal dotted cross", "a red circle", "the man in a coat"]
KINDS = {"grounding-dino": save_tiny_grounding_dino, "owlv2": save_tiny_owlv2}


@pytest.fixture(scope="module")
def tiny_detectors(tmp_path_factory) -> dict[str, str]:
    return {kind: save(tmp_path_factory.mktemp(kind), seed=0) for kind, save in KINDS.items()}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)


def open_settings(path: str, **kw) -> DetectSettings:
    """Thresholds low enough that a random model's boxes pass."""
    return DetectSettings(**{"model": path, "score_threshold": 0.0, "text_threshold": 0.0, "min_box": 0.0,
                             "device": "cpu", **kw})


def test_nms_keeps_the_best_of_each_overlapping_group():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9.5], [21, 20, 30, 30]],
                         dtype=torch.float64)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.8, 0.6], dtype=torch.float64)
    # 1 beats 0 (IoU 0.68) but not 3 (IoU 0.64 > 0.5 too): 3 goes; 2 beats 4 (IoU 0.9)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.95).tolist() == [1, 3, 2, 4, 0]  # nothing overlaps that much
    assert nms(boxes, scores, 1.0).tolist() == [1, 3, 2, 4, 0]


def test_pairwise_iou_agrees_with_box_iou():
    gen = torch.Generator().manual_seed(0)
    lo, size = torch.rand(6, 2, generator=gen) * 50, torch.rand(6, 2, generator=gen) * 30
    boxes = torch.cat([lo, lo + size], -1).double()
    m = pairwise_iou(boxes, boxes)
    for i in range(6):
        for j in range(6):
            assert m[i, j].item() == pytest.approx(box_iou(boxes[i].tolist(), boxes[j].tolist()))


def test_finalize_clips_thresholds_drops_small_boxes_and_sorts():
    found = [Detection((-5, -5, 20, 20), "a", 0.6), Detection((50, 50, 53, 90), "b", 0.9),  # 3 px wide
             Detection((30, 10, 90, 70), "c", 0.2), Detection((30, 10, 90, 75), "a", 0.7),
             Detection((0, 0, 22, 22), "b", 0.5), Detection((100, 70, 140, 100), "c", 0.95)]
    kept = finalize(found, DetectSettings(score_threshold=0.3, min_box=4, nms_iou=0.5), width=120, height=80)
    assert [(d.label, d.score) for d in kept] == [("c", 0.95), ("a", 0.7), ("a", 0.6)]
    assert kept[0].box == (100, 70, 120, 80) and kept[2].box == (0, 0, 20, 20)  # clipped to the image
    assert len(finalize(found, DetectSettings(score_threshold=0.0, min_box=0, nms_iou=1.0), 120, 80)) == 6
    assert finalize([], DetectSettings(), 10, 10) == []


@pytest.mark.parametrize("field, value", [("score_threshold", 1.5), ("score_threshold", -0.1),
                                          ("text_threshold", 2.0), ("nms_iou", 0.0), ("min_box", -1.0),
                                          ("dtype", "float8"), ("device", "gpu:x"), ("model", " ")])
def test_bad_settings_are_refused_naming_the_flag(field, value):
    with pytest.raises(ValueError, match=rf"--detector\.{field}"):
        DetectSettings(**{field: value})


def test_unknown_kind_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--detector must be one of \['grounding-dino', 'owlv2'\]"):
        load_detector("florence-2", DetectSettings())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_detect_all_returns_well_formed_sorted_detections(kind, tiny_detectors, image):
    settings = open_settings(tiny_detectors[kind], nms_iou=0.5, min_box=2.0)
    detector = load_detector(kind, settings)
    assert isinstance(detector, {"grounding-dino": GroundingDinoDetector, "owlv2": Owlv2Detector}[kind])
    found = detector.detect_all(image, VOCABULARY)
    assert found, "a random model with open thresholds finds something"
    scores = [d.score for d in found]
    assert scores == sorted(scores, reverse=True)
    for d in found:
        assert isinstance(d, Detection) and d.label in VOCABULARY and 0.0 <= d.score <= 1.0
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 80
        assert min(x1 - x0, y1 - y0) >= 2.0
    boxes = torch.tensor([d.box for d in found], dtype=torch.float64)
    overlaps = pairwise_iou(boxes, boxes).fill_diagonal_(0)
    assert overlaps.max().item() <= 0.5  # class-agnostic NMS


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_thresholds_nms_and_min_box_only_drop_boxes(kind, tiny_detectors, image):
    path = tiny_detectors[kind]
    everything = load_detector(kind, open_settings(path, nms_iou=1.0)).detect_all(image, VOCABULARY)
    suppressed = load_detector(kind, open_settings(path, nms_iou=0.01)).detect_all(image, VOCABULARY)
    median = float(np.median([d.score for d in everything]))
    strict = load_detector(kind, open_settings(path, nms_iou=1.0, score_threshold=median)).detect_all(image, VOCABULARY)
    big = load_detector(kind, open_settings(path, nms_iou=1.0, min_box=20)).detect_all(image, VOCABULARY)
    assert set(suppressed) < set(everything) and set(strict) < set(everything) and set(big) <= set(everything)
    assert all(d.score > median for d in strict)
    boxes = torch.tensor([d.box for d in suppressed], dtype=torch.float64)
    assert pairwise_iou(boxes, boxes).fill_diagonal_(0).max().item() <= 0.01
    assert all(min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= 20 for d in big)
    assert load_detector(kind, open_settings(path, score_threshold=0.999999)).detect_all(image, VOCABULARY) == [
        d for d in suppressed if d.score > 0.999999]


def test_grounding_dino_text_threshold_needs_a_phrase_token(tiny_detectors, image):
    path = tiny_detectors["grounding-dino"]
    loose = load_detector("grounding-dino", open_settings(path, nms_iou=1.0)).detect_all(image, VOCABULARY)
    tight = load_detector("grounding-dino", open_settings(path, nms_iou=1.0, text_threshold=0.9))
    assert set(tight.detect_all(image, VOCABULARY)) < set(loose)


def test_grounding_dino_splits_a_long_vocabulary_into_prompts_that_fit(tiny_detectors, image):
    detector = load_detector("grounding-dino", open_settings(tiny_detectors["grounding-dino"], nms_iou=1.0))
    many = [f"{p} number {i}" for i in range(4) for p in VOCABULARY]  # far over the 62 tokens of one prompt
    assert len(detector._chunks(many)) > 2
    found = detector.detect_all(image, many)
    assert len(found) == 30 * len(detector._chunks(many))  # every query of every prompt, nothing merged
    with pytest.raises(ValueError, match="has .* tokens, more than the model's 62"):
        detector.detect_all(image, ["x" * 80])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_detect_answers_an_instance_with_its_captions_best_box(kind, tiny_detectors, image):
    detector = load_detector(kind, open_settings(tiny_detectors[kind]))
    instance = {"caption": "a red circle", "bbox": [0.1, 0.1, 0.5, 0.5]}
    assert detector.detect(image, instance) == detector.detect_all(image, ["a red circle"])[0].box
    closed = load_detector(kind, open_settings(tiny_detectors[kind], min_box=1000))
    assert closed.detect(image, instance) is None
    with pytest.raises(ValueError, match=f"--detector {kind} queries each layout instance's 'caption'"):
        detector.detect(image, {"bbox": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match="vocabulary"):
        detector.detect_all(image, [])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bfloat16_detections_are_well_formed(kind, tiny_detectors, image):
    detector = load_detector(kind, open_settings(tiny_detectors[kind], dtype="bfloat16"))
    assert next(detector.model.parameters()).dtype == torch.bfloat16
    found = detector.detect_all(image, VOCABULARY)
    assert found and all(isinstance(v, float) for d in found for v in (*d.box, d.score))


def test_detection_is_deterministic(tiny_detectors, image):
    a = load_detector("owlv2", open_settings(tiny_detectors["owlv2"])).detect_all(image, VOCABULARY)
    b = load_detector("owlv2", open_settings(tiny_detectors["owlv2"])).detect_all(image, VOCABULARY)
    assert a == b


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_missing_model_is_a_three_line_error_naming_the_flag(kind, tmp_path):
    missing = str(tmp_path / "no_such_detector")
    with pytest.raises(ValueError) as e:
        load_detector(kind, DetectSettings(model=missing))
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"detector.model: cannot load the {kind} detector")
    assert "--detector.model=/path/to/folder" in lines[2]


def test_a_folder_of_the_other_kind_is_refused_naming_the_flag(tiny_detectors):
    with pytest.raises(ValueError, match=r"--detector\.model: .* holds a 'owlv2' model, not the 'grounding-dino'"):
        load_detector("grounding-dino", DetectSettings(model=tiny_detectors["owlv2"]))
