"""Shots and the shot list: the layouts JSONL that `mpp generate` reads, checked as it checks them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mpp.layouts import read_layouts
from mpp.studio.shots import Shot, ShotBox, check_shot, frame_presets, read_shot_list, write_shot_list


def _shot(**kw) -> Shot:
    base = dict(id="sc12_sh3", prompt="two actors on a quay", width=176, height=96, seed=7, steps=4,
                layout_guidance=3.0, boxes=[ShotBox([10, 8, 60, 90], "a man in a coat"),
                                            ShotBox([100.5, 20, 170, 96], "a crate")])
    return Shot(**{**base, **kw})


def test_frame_presets_are_the_film_ratios_and_the_training_buckets():
    presets = frame_presets(1024, [(1024, 1024), (1360, 768), (768, 1360)])
    sizes = list(presets.values())
    assert sizes[:4] == [(1024, 1024), (1360, 768), (1392, 752), (1584, 656)]
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)
    assert "training bucket  768×1360" in presets and len(presets) == 7  # no repeated size is added
    assert list(frame_presets(128).values()) == [(128, 128), (176, 96), (176, 96), (192, 80)]


def test_a_shot_list_round_trips_and_mpp_generate_reads_it(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(np.full((32, 24, 3), 200, np.uint8)).save(refs / "anna.png")
    anna = _shot(boxes=[ShotBox([10, 8, 60, 90], "a woman", str(refs / "anna.png")), ShotBox([100, 20, 170, 96])],
                 plate=str(refs / "anna.png"))
    other = _shot(id="sc12_sh4", seed=8, steps=None, layout_guidance=None, identity_guidance=1.5)
    path = tmp_path / "list" / "shots.jsonl"
    path.parent.mkdir()
    write_shot_list(str(path), [anna, other])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["instances"][0]["reference"] == "../refs/anna.png"  # relative to the file
    assert lines[0]["sampling"] == {"steps": 4, "layout_guidance": 3.0} and lines[0]["seed"] == 7
    assert lines[1]["sampling"] == {"identity_guidance": 1.5}
    assert all(0 <= v <= 1 for line in lines for inst in line["instances"] for v in inst["bbox"])

    shots, errors = read_shot_list(str(path), resolution=128)
    assert errors == []
    assert [s.id for s in shots] == ["sc12_sh3", "sc12_sh4"]
    back = shots[0]
    assert (back.width, back.height, back.seed, back.steps, back.layout_guidance) == (176, 96, 7, 4, 3.0)
    np.testing.assert_allclose([b.bbox for b in back.boxes], [b.bbox for b in anna.boxes], atol=0.01)
    assert back.boxes[0].reference == str(refs / "anna.png") and back.boxes[0].role == "foreground"
    assert back.boxes[1].reference is None and back.boxes[1].role == "background"
    assert back.plate == str(refs / "anna.png")
    assert shots[1].steps is None and shots[1].identity_guidance == 1.5

    layouts, errors = read_layouts(str(path), resolution=128)  # what `mpp generate` makes of it
    assert errors == []
    assert layouts[0].seed == 7 and layouts[0].sampling == {"steps": 4, "layout_guidance": 3.0}
    assert (layouts[0].width, layouts[0].height) == (176, 96)
    torch.testing.assert_close(layouts[0].boxes, check_shot(anna, str(path.parent)).boxes)
    assert layouts[0].references[0].shape == (3, 32, 24) and layouts[0].references[1] is None


@pytest.mark.parametrize(("change", "message"), [
    (dict(boxes=[ShotBox([100, 20, 180, 96])]), r"box 1 \[100, 20, 180, 96\] lies outside the 176×96 frame"),
    (dict(boxes=[ShotBox([-1, 20, 50, 96])]), "lies outside"),
    (dict(boxes=[ShotBox([40, 20, 40, 96])]), "box 1 .* has zero size"),
    (dict(boxes=[ShotBox([10, 10, 50, 50]), ShotBox([60, 30, 60.4, 50])]), "box 2 .* has zero size"),
    (dict(boxes=[]), "draw at least one box"),
    (dict(width=180), "frame 180×96 must be a positive multiple of 16"),
    (dict(id=" "), "needs an id"),
    (dict(steps=0), "sampling 'steps' must be a whole number >= 1"),
    (dict(layout_guidance=-1.0), "'layout_guidance' must be a number >= 0"),
])
def test_a_bad_shot_is_refused_with_what_is_wrong(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        check_shot(_shot(**change), str(tmp_path))


def test_an_unreadable_or_missing_reference_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        check_shot(_shot(boxes=[ShotBox([0, 0, 50, 50], "a", str(tmp_path / "broken.png"))]), str(tmp_path))
    with pytest.raises(ValueError, match="gone.png does not exist"):
        check_shot(_shot(boxes=[ShotBox([0, 0, 50, 50], "a", str(tmp_path / "gone.png"))]), str(tmp_path))


def test_reading_a_shot_list_names_each_bad_line_and_keeps_the_good(tmp_path):
    path = tmp_path / "shots.jsonl"
    good = {"id": "a", "prompt": "p", "instances": [{"bbox": [0.1, 0.1, 0.5, 0.5], "caption": "x"}]}
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "seed": -1}),
                               json.dumps({**good, "sampling": {"stepz": 3}}), json.dumps({**good, "id": "b"}),
                               json.dumps(good)]) + "\n")
    shots, errors = read_shot_list(str(path), resolution=128)
    assert [s.id for s in shots] == ["a", "b"] and [s.seed for s in shots] == [0, 1]  # mpp generate's seeds
    assert [e.split(":")[1] for e in errors] == ["2", "3", "4", "6"]
    assert "'seed' must be a whole number >= 0" in errors[1] and "unknown keys ['stepz']" in errors[2]
    assert "repeats an earlier line" in errors[3]
    with pytest.raises(ValueError, match="shot ids must be unique"):
        write_shot_list(str(tmp_path / "x.jsonl"), [shots[0], shots[0]])
    with pytest.raises(ValueError, match="cannot read the shot list"):
        read_shot_list(str(tmp_path / "nowhere.jsonl"), resolution=128)
