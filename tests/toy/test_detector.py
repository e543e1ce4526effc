"""The toy detector finds every instance of toy scenes, in PNGs and in H.264 frames, without being told
their colours or boxes; the toy captioner names them in the toy captions' words."""


import numpy as np
import pytest
import torch

from mpp.annotate.frames import FrameSettings, frames
from mpp.evaluate import box_iou
from mpp.toy.captioner import ToyCaptioner
from mpp.toy.detector import ToyDetector
from mpp.toy.footage import write_toy_video
from mpp.toy.judge import IdentityJudge
from mpp.toy.scenes import ToyWorld

WORLD = ToyWorld(seed=0, num_identities=120, describe_prob=0.5, min_box=48, max_box=96)


def matches(detections, truth) -> tuple[int, int, int]:
    """(true positives, false positives, misses) at IoU >= 0.5, one detection per true box."""
    used, tp = set(), 0
    for d in detections:
        best = max(range(len(truth)), key=lambda k: box_iou(d.box, truth[k]))
        if box_iou(d.box, truth[best]) >= 0.5 and best not in used:
            used.add(best)
            tp += 1
    return tp, len(detections) - tp, len(truth) - len(used)


def test_every_instance_of_toy_scenes_is_found_and_nothing_else():
    counts = np.array([matches(ToyDetector().detect_all(s.image, []), [i.bbox for i in s.instances])
                       for s in (WORLD.scene(i) for i in range(40))]).sum(0)
    assert counts[0] >= 60 and counts[1] == 0 and counts[2] == 0, counts


def test_h264_frames_are_detected_as_well(tmp_path):
    path = str(tmp_path / "toy.mp4")
    truth = write_toy_video(path, WORLD, list(range(12)), frames_per_shot=4, jitter=0)
    kept = [f for f in frames([path], FrameSettings(stride=10.0)) if hasattr(f, "image")]
    assert [f.shot for f in kept] == list(range(12))
    counts = np.array([matches(ToyDetector().detect_all(f.image, []), [i["bbox"] for i in shot["instances"]])
                       for f, shot in zip(kept, truth["shots"], strict=True)]).sum(0)
    assert counts[1] == 0 and counts[2] == 0, counts


def test_a_plain_or_white_frame_has_no_instance_and_small_boxes_are_dropped():
    assert ToyDetector().detect_all(np.full((64, 64, 3), 255, np.uint8), []) == []
    assert ToyDetector().detect_all(WORLD.scene(0).image * 0 + np.uint8([215, 190, 140]), []) == []
    image = np.full((64, 64, 3), 255, np.uint8)
    image[10:20, 10:20] = (220, 30, 30)
    assert [d.box for d in ToyDetector(min_pixels=20).detect_all(image, [])] == [(10.0, 10.0, 20.0, 20.0)]
    assert ToyDetector(min_pixels=20, min_box=12).detect_all(image, []) == []
    with pytest.raises(ValueError, match="ToyDetector"):
        ToyDetector(tol=0)


def test_the_toy_captioner_names_colour_and_kind_in_the_toy_words():

    torch.manual_seed(0)
    captioner = ToyCaptioner(IdentityJudge())  # untrained: its shape and texture are arbitrary, its words are not
    scene = next(s for s in (WORLD.scene(i) for i in range(40)) if any(not i.foreground for i in s.instances))
    captions = captioner.caption_regions(scene.image, [i.bbox for i in scene.instances])
    for inst, caption in zip(scene.instances, captions, strict=True):
        if inst.foreground:
            assert caption.split()[1] == WORLD.identity(inst.identity).caption.split()[1]  # the colour word
            assert caption.split()[-1] in ("square", "circle", "cross", "hexagon")
        else:
            assert caption == inst.caption  # "a grey block"
    words = set(WORLD.vocabulary())
    assert set(ToyWorld.tokens(captioner.caption(scene.image))) <= words
