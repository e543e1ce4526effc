"""The studio's session: a shot rendered in the app is the same pixels `mpp generate` makes of the saved
shot list, and everything it writes stays in its output folder."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mpp.__main__ import main as mpp_main
from mpp.studio.session import Studio, cast_gallery, load_checkpoint_engine
from mpp.studio.shots import ShotBox
from tests.helpers import train_toy_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_models, toy_prepared):
    """A stage-1 checkpoint of the toy (2 steps) and the configs and flags that built it."""
    ckpt, args = train_toy_checkpoint(tmp_path_factory.mktemp("studio_run"), toy_models, toy_prepared)
    flags = args[1:]
    configs = [flags[i + 1] for i, a in enumerate(flags) if a == "--config"]
    overrides = [a for a in flags if a.startswith("--") and a != "--config" and "=" in a]
    return ckpt, configs, overrides


@pytest.fixture(scope="module")
def engine(trained):
    ckpt, configs, overrides = trained
    return load_checkpoint_engine(configs, ckpt, overrides)


def _files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


def test_the_app_and_mpp_generate_give_the_same_pixels(tmp_path, trained, engine, toy_world):
    ckpt, configs, overrides = trained
    out = tmp_path / "studio"
    studio = Studio(engine, str(out))
    scene = toy_world.scene(3)
    ref = next(i for i in scene.instances if i.foreground)
    photo = tmp_path / "cast_photo.png"  # outside the folder: copied in
    Image.fromarray(toy_world.reference(ref.identity)).save(photo)
    shot = studio.new_shot("sc1/sh1", width=176, height=96)
    assert (shot.steps, shot.seed) == (engine.sampling.steps, engine.sampling.seed)
    shot.prompt, shot.steps, shot.seed, shot.layout_guidance = scene.caption, 3, 11, 2.0
    shot.boxes = [ShotBox([10, 8, 70, 90], ref.caption, studio.add_reference(str(photo))),
                  ShotBox([96, 16, 170, 80], "a grey block")]
    wide = studio.render(shot)
    second = studio.new_shot("sc1/sh2")
    second.prompt, second.steps, second.boxes = "a square", 2, [ShotBox([20, 20, 100, 100], "a red square")]
    square = studio.render(second)
    assert wide.image.shape == (96, 176, 3) and square.image.shape == (128, 128, 3)
    assert len(wide.alpha) == 2 and wide.record["seed"] == 11
    assert not np.array_equal(wide.overlay, wide.image)  # the boxes are drawn
    path = studio.save([shot, second])
    report = json.load(open(out / "generated.json"))
    assert [r["id"] for r in report["images"]] == ["sc1/sh1", "sc1/sh2"] and report["checkpoint"] == ckpt
    assert _files(out) <= {"shots.jsonl", "generated.json", "sc1_sh1.png", "sc1_sh1_boxes.png", "sc1_sh2.png",
                           "sc1_sh2_boxes.png", *(f"references/{f}" for f in os.listdir(out / "references"))}

    cli = tmp_path / "cli"  # batch-rendered from the saved list, with other run-wide seed and steps
    assert mpp_main(["generate", *[x for c in configs for x in ("--config", c)], "--ckpt_path", ckpt,
                     "--layouts", path, "--out", str(cli), "--seed", "5", "--steps", "9", *overrides]) == 0
    for name, app in (("sc1_sh1", wide), ("sc1_sh2", square)):
        assert np.array_equal(np.asarray(Image.open(cli / f"{name}.png")), app.image), name
        assert np.array_equal(np.asarray(Image.open(cli / f"{name}_boxes.png").convert("RGB")), app.overlay), name
    assert json.load(open(cli / "generated.json"))["images"] == report["images"]

    # a seed-variation strip: other seeds, other pixels, its own files; the report keeps the shots
    strip = studio.seed_strip(shot, 2)
    assert [r.record["seed"] for r in strip] == [11, 12] and np.array_equal(strip[0].image, wide.image)
    assert not np.array_equal(strip[1].image, wide.image)
    assert os.path.exists(out / "sc1_sh1_seed12.png")
    assert len(json.load(open(out / "generated.json"))["images"]) == 2

    # the folder reopens with its shots and its report
    again = Studio(engine, str(out))
    shots, errors = again.load()
    assert errors == [] and [s.id for s in shots] == ["sc1/sh1", "sc1/sh2"] and set(again.records) == set(
        studio.records)
    assert shots[0].boxes[0].reference.startswith(str(out / "references"))


def test_bad_input_is_a_message_and_writes_nothing(tmp_path, engine, trained):
    out = tmp_path / "studio"
    studio = Studio(engine, str(out))
    shot = studio.new_shot("x")
    shot.boxes = [ShotBox([0, 0, 200, 50], "a")]
    with pytest.raises(ValueError, match=r"box 1 .* lies outside the 128×128 frame"):
        studio.render(shot)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        studio.add_reference(str(tmp_path / "broken.png"))
    assert _files(out) == set()
    # a checkpoint of another model: named, with the setting it was trained with
    ckpt, configs, overrides = trained
    with pytest.raises(ValueError, match=r"modulation_grid=8 \(this run: 2\)"):
        load_checkpoint_engine(configs, ckpt, [*overrides, "--model.heads.modulation_grid=2"])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt: not a readable checkpoint"):
        load_checkpoint_engine(configs, str(tmp_path / "junk.ckpt"), overrides)
    with pytest.raises(ValueError, match="--ckpt_path .*gone.ckpt: no such file"):
        load_checkpoint_engine(configs, str(tmp_path / "gone.ckpt"), overrides)


def test_the_cast_folder_is_a_gallery_per_character(tmp_path):
    for name in ("anna", "ben"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "1.jpg")
    (tmp_path / "ben" / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    cast = cast_gallery(str(tmp_path))
    assert list(cast) == ["anna", "ben"] and cast["ben"] == [str(tmp_path / "ben" / "1.jpg")]
    with pytest.raises(ValueError, match="no subfolder holds a photo"):
        cast_gallery(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a folder"):
        cast_gallery(str(tmp_path / "nowhere"))
