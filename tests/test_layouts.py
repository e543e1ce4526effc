"""The layouts JSONL: what a line must hold, and how a bad one is reported."""

import json

import numpy as np
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
