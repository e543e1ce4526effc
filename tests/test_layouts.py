"""The layouts JSONL: what a line must hold, and how a bad one is reported."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mpp.layouts import read_layouts


def test_read_layouts_reports_bad_lines_by_number(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ref.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        {"id": "a", "prompt": "a red square",
         "instances": [{"bbox": [0.1, 0.1, 0.5, 0.5], "caption": "a red square", "reference": "ref.png"}]},
        {"id": "b", "prompt": "x"},
        {"id": "c", "prompt": "x", "instances": [{"bbox": [10, 10, 300, 40]}]},
        {"id": "d", "prompt": "x", "instances": [{"bbox": [0.1, 0.1, 0.2, 0.2], "reference": "missing.png"}]},
        {"id": "e", "prompt": "x", "instances": [{"bbox": [0.1, 0.1, 0.2, 0.2], "reference": "broken.png"}]},
        {"id": "f", "prompt": "two boxes in pixels",
         "instances": [{"bbox": [0, 0, 64, 64]}, {"bbox": [64, 64, 128, 128]}]},
    ]
    path = tmp_path / "layouts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    layouts, errors = read_layouts(str(path), resolution=128)
    assert [x.id for x in layouts] == ["a", "f"]
    assert layouts[1].boxes.tolist() == [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    assert errors[0].startswith(f"{path}:2:") and "instances" in errors[0]
    assert errors[1].startswith(f"{path}:3:") and "outside" in errors[1]
    assert errors[2].startswith(f"{path}:4:") and "missing.png does not exist" in errors[2]
    assert errors[3].startswith(f"{path}:5:") and "unreadable image" in errors[3]
    assert errors[4].startswith(f"{path}:7:")


def test_a_line_gives_its_own_size_and_its_pixel_boxes_follow_it(tmp_path):
    lines = [
        {"id": "wide", "prompt": "x", "width": 176, "height": 96, "instances": [{"bbox": [88, 48, 176, 96]}]},
        {"id": "scope", "prompt": "x", "width": 1584, "height": 656, "instances": [{"bbox": [0.1, 0.2, 0.3, 0.4]}]},
        {"id": "odd", "prompt": "x", "width": 170, "height": 96, "instances": [{"bbox": [0.1, 0.1, 0.2, 0.2]}]},
        {"id": "half", "prompt": "x", "width": 176, "instances": [{"bbox": [0.1, 0.1, 0.2, 0.2]}]},
        {"id": "text", "prompt": "x", "width": "176", "height": 96, "instances": [{"bbox": [0.1, 0.1, 0.2, 0.2]}]},
        {"id": "out", "prompt": "x", "width": 176, "height": 96, "instances": [{"bbox": [100, 10, 180, 40]}]},
        {"id": "square", "prompt": "x", "instances": [{"bbox": [64, 0, 128, 64]}]},
    ]
    path = tmp_path / "layouts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    layouts, errors = read_layouts(str(path), resolution=128)
    assert [(x.id, x.width, x.height) for x in layouts] == [("wide", 176, 96), ("scope", 1584, 656),
                                                            ("square", 128, 128)]
    assert layouts[0].boxes.tolist() == [[0.5, 0.5, 1.0, 1.0]]
    assert layouts[2].boxes.tolist() == [[0.5, 0.0, 1.0, 0.5]]
    assert errors[0].startswith(f"{path}:3:") and "width 170 must be a positive multiple of 16" in errors[0]
    assert errors[1].startswith(f"{path}:4:") and "'width' and 'height' must both be given" in errors[1]
    assert errors[2].startswith(f"{path}:5:") and "whole pixels" in errors[2]
    assert errors[3].startswith(f"{path}:6:") and "outside the 176×96 image" in errors[3]


@pytest.mark.timeout(60)
def test_a_fifo_reference_or_layouts_file_is_a_named_error_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "ref.png")  # opening it would block until someone writes
    line = {"id": "a", "prompt": "x", "instances": [{"bbox": [0.1, 0.1, 0.5, 0.5], "reference": "ref.png"}]}
    (tmp_path / "layouts.jsonl").write_text(json.dumps(line) + "\n")
    layouts, errors = read_layouts(str(tmp_path / "layouts.jsonl"), resolution=128)
    assert not layouts and errors == [f"{tmp_path / 'layouts.jsonl'}:1: {tmp_path / 'ref.png'}: not a regular file "
                                      "(a FIFO, device, socket or folder)"]
    os.mkfifo(tmp_path / "piped.jsonl")
    with pytest.raises(ValueError, match="piped.jsonl: not a regular file"):
        read_layouts(str(tmp_path / "piped.jsonl"), resolution=128)
