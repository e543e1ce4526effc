"""The `mpp generate` command and `main.py predict`: the same images and report from a checkpoint."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mpp.__main__ import main as mpp_main
from mpp.cli import main as cli_main
from mpp.viz import BACKGROUND, FOREGROUND
from tests.helpers import fit_args


def test_generate_end_to_end_from_a_toy_checkpoint(tmp_path, monkeypatch, capsys, toy_models, toy_prepared, toy_world):
    monkeypatch.chdir(tmp_path)
    args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1")
    cli_main(args)
    ckpt = tmp_path / "runs/checkpoints/stage1/step=0000001.ckpt"
    scene = toy_world.scene(3)
    ref = next(i for i in scene.instances if i.foreground)
    Image.fromarray(toy_world.reference(ref.identity)).save(tmp_path / "ref.png")
    good = {"id": "shot1", "prompt": scene.caption,
            "instances": [{"bbox": list(i.bbox), "caption": i.caption, **({"reference": "ref.png"} if i is ref else {})}
                          for i in scene.instances]}
    bad = [{"id": "shot2", "prompt": "x", "instances": [{"bbox": [0, 0, 500, 10]}]},  # outside the image
           {"id": "shot3", "prompt": "x"},  # no boxes
           {"id": "shot4", "prompt": "x", "instances": [{"bbox": [0.1, 0.1, 0.5, 0.5], "reference": "nowhere.png"}]},
           {"id": "shot6", "prompt": "x", "instances": [{"bbox": [0.5, 0.5, 1.3, 0.9]}]}]  # a typo, read as pixels
    # 16:9 at the toy's scale (176×96), boxes in its pixels: the scene's boxes moved into the wider frame
    wide_boxes = [[x0 + 24, y0 * 96 // 128, x1 + 24, y1 * 96 // 128]
                  for x0, y0, x1, y1 in (i.bbox for i in scene.instances)]
    wide = {**good, "id": "wide", "width": 176, "height": 96,
            "instances": [{**inst, "bbox": box} for inst, box in zip(good["instances"], wide_boxes, strict=True)]}
    odd = {**good, "id": "odd", "width": 180, "height": 96}
    lines = [bad[0], good, *bad[1:], {**good, "id": "shot5"}, wide, odd]
    (tmp_path / "layouts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    flags = [a for a in args[1:]]  # the same configs and flags as the training run
    configs = [flags[i + 1] for i, a in enumerate(flags) if a == "--config"]
    overrides = [a for a in flags if a.startswith("--") and a != "--config" and "=" in a]
    out = tmp_path / "out"
    assert mpp_main(["generate", *[x for c in configs for x in ("--config", c)], "--ckpt_path", str(ckpt),
                     "--layouts", "layouts.jsonl", "--out", str(out), "--steps", "2", *overrides]) == 1  # bad lines
    progress = capsys.readouterr().err  # a bar over the good layouts
    assert "generating: 100%" in progress and "3/3" in progress
    report = json.load(open(out / "generated.json"))
    assert [r["id"] for r in report["images"]] == ["shot1", "shot5", "wide"]
    assert [e.split(":")[1] for e in report["errors"]] == ["1", "3", "4", "5", "8"]
    assert "under one pixel" in report["errors"][3]
    assert "width 180 must be a positive multiple of 16" in report["errors"][4]
    for name in ("shot1.png", "shot1_boxes.png", "shot5.png"):
        assert Image.open(out / name).size == (128, 128)
    assert len(report["images"][0]["alpha"]) == len(scene.instances)
    _is_where_the_layout_says(out, report["images"][2], wide_boxes, (176, 96))

    # a file of bad lines only: each reported, the report written, no image, exit code 1
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in bad) + "not json\n")
    assert mpp_main(["generate", *[x for c in configs for x in ("--config", c)], "--ckpt_path", str(ckpt),
                     "--layouts", "bad.jsonl", "--out", str(tmp_path / "none"), "--steps", "2", *overrides]) == 1
    nothing = json.load(open(tmp_path / "none/generated.json"))
    assert nothing["images"] == [] and len(nothing["errors"]) == 5
    assert os.listdir(tmp_path / "none") == ["generated.json"]

    # `main.py predict` runs the same generation through Lightning: the same images, the same report
    predict = ["predict", *[x for c in configs for x in ("--config", c)], *overrides, f"--ckpt_path={ckpt}",
               "--data.predict_file=layouts.jsonl", "--model.sampling.steps=2", "--model.sampling.seed=0"]
    logs = os.listdir(tmp_path / "runs/logs")
    assert cli_main(predict).config.predict.return_predictions is False  # images go to disk, not memory
    assert os.listdir(tmp_path / "runs/logs") == logs and not os.path.exists(tmp_path / "config.yaml")
    predicted = json.load(open(tmp_path / "runs/generated/stage1/generated.json"))
    assert predicted["images"] == report["images"]
    assert predicted["errors"] == report["errors"] and predicted["checkpoint"] == str(ckpt)
    for name in ("shot1.png", "shot1_boxes.png", "shot5.png", "shot5_boxes.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)),
                              np.asarray(Image.open(tmp_path / "runs/generated/stage1" / name)))
    # a head setting other than the checkpoint's: refused, naming the setting it was trained with
    other = "--model.heads.modulation_grid=2"
    with pytest.raises(ValueError, match=r"modulation_grid=8 \(this run: 2\)"):
        mpp_main(["generate", *[x for c in configs for x in ("--config", c)], "--ckpt_path", str(ckpt),
                  "--layouts", "layouts.jsonl", "--out", str(tmp_path / "other"), *overrides, other])
    with pytest.raises(ValueError, match=r"modulation_grid=8 \(this run: 2\)"):
        cli_main([*predict, other])
    no_ckpt = [a for a in predict if not a.startswith("--ckpt_path")]
    with pytest.raises(ValueError, match="--ckpt_path"):
        cli_main(no_ckpt)
    with pytest.raises(ValueError, match="--data.predict_file"):
        cli_main([a for a in predict if not a.startswith("--data.predict_file")])


def _is_where_the_layout_says(out, record, boxes, size) -> None:
    """A generated image of `size` whose report and overlay put each box at its layout's pixels."""
    width, height = size
    assert Image.open(out / record["image"]).size == size == (record["width"], record["height"])
    expected = [[x0 / width, y0 / height, x1 / width, y1 / height] for x0, y0, x1, y1 in boxes]
    np.testing.assert_allclose(record["boxes"], expected, atol=1e-6)
    overlay = np.asarray(Image.open(out / record["image_with_boxes"]).convert("RGB"))
    for (x0, y0, x1, y1), a in zip(boxes, record["alpha"], strict=True):
        colour = FOREGROUND if a > 0.5 else BACKGROUND
        for x, y in ((x0, y0), (x1 - 1, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)):  # the outline's corners
            assert tuple(overlay[y, x]) == colour, (x, y)


def test_ckpt_is_a_deprecated_name_of_ckpt_path(monkeypatch):
    import mpp.generate

    class Loaded(Exception):
        pass

    def load_module(configs, ckpt, overrides):
        raise Loaded(ckpt)

    monkeypatch.setattr(mpp.generate, "load_module", load_module)
    flags = ["--config", "c.yaml", "--layouts", "l.jsonl", "--out", "out"]
    with pytest.warns(FutureWarning, match="--ckpt_path"), pytest.raises(Loaded, match="old.ckpt"):
        mpp.generate.main([*flags, "--ckpt", "old.ckpt"])
    with pytest.raises(ValueError, match="--ckpt_path"):
        mpp.generate.main([*flags, "--ckpt", "old.ckpt", "--ckpt_path", "new.ckpt"])
    with pytest.raises(SystemExit):
        mpp.generate.main(flags)
