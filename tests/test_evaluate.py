import numpy as np
import pytest

from mpp.evaluate import ToyColorDetector, color_histogram_similarity, evaluate, mask_box


def _layouts(world, indices):
    images, layouts = {}, {}
    for i in indices:
        scene = world.scene(i)
        h, w = scene.image.shape[:2]
        images[scene.id] = scene.image
        layouts[scene.id] = {"instances": [
            {"bbox": [inst.bbox[0] / w, inst.bbox[1] / h, inst.bbox[2] / w, inst.bbox[3] / h],
             "color": list(inst.color), "caption": inst.caption} for inst in scene.instances]}
    return images, layouts


def test_ground_truth_scenes_place_every_instance(toy_world):
    images, layouts = _layouts(toy_world, range(40))
    result = evaluate(images, layouts, ToyColorDetector())
    assert result["instances"] > 60
    assert result["miou"] > 0.85 and result["success_at_0.5"] > 0.9


def test_misplaced_and_missing_instances_score_low(toy_world):
    images, layouts = _layouts(toy_world, range(40))
    shifted = {k: np.roll(v, shift=(40, 40), axis=(0, 1)) for k, v in images.items()}
    blank = {k: np.full_like(v, 200) for k, v in images.items()}
    good = evaluate(images, layouts, ToyColorDetector())["miou"]
    assert evaluate(shifted, layouts, ToyColorDetector())["miou"] < good / 2
    assert evaluate(blank, layouts, ToyColorDetector()) == {"images": 40, "instances": pytest.approx(
        sum(len(x["instances"]) for x in layouts.values())), "miou": 0.0, "success_at_0.5": 0.0}


def test_color_histogram_similarity():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert color_histogram_similarity(a, a) == pytest.approx(1.0)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 220
    assert color_histogram_similarity(red, blue) == 0.0


def test_toy_detector_needs_colours():
    with pytest.raises(ValueError, match="'color'"):
        ToyColorDetector().detect(np.zeros((4, 4, 3), np.uint8), {"caption": "x"})


def test_cli_reads_generate_output(toy_world, toy_models, tmp_path, capsys):
    import json

    from PIL import Image

    from mpp.evaluate import main

    scene = toy_world.scene(7)
    h, w = scene.image.shape[:2]
    boxes = [[i.bbox[0] / w, i.bbox[1] / h, i.bbox[2] / w, i.bbox[3] / h] for i in scene.instances]
    Image.fromarray(scene.image).save(tmp_path / "s.png")
    Image.fromarray(scene.image).save(tmp_path / "ref.png")
    (tmp_path / "generated.json").write_text(json.dumps({"images": [{"id": "s", "image": "s.png", "boxes": boxes}]}))
    layout = {"id": "s", "prompt": scene.caption, "instances": [
        {"bbox": list(i.bbox), "color": list(i.color), "reference": "ref.png"} for i in scene.instances]}
    (tmp_path / "layouts.jsonl").write_text(json.dumps(layout) + "\n")
    assert main(["--generated", str(tmp_path), "--layouts", str(tmp_path / "layouts.jsonl"),
                 "--dino", f"{toy_models}/dino"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["instances"] == len(scene.instances) and result["miou"] > 0.8
    assert 0 < result["color_histogram_similarity"] <= 1
    assert -1 <= result["dino_similarity"] <= 1


def test_dino_similarity_of_an_image_with_itself_is_one(toy_settings, toy_world):
    from mpp.encoders import Encoders
    from mpp.evaluate import dino_similarity

    enc = Encoders(toy_settings)
    a = toy_world.scene(0).image
    assert dino_similarity(enc, a, a) == pytest.approx(1.0, abs=1e-5)
    assert dino_similarity(enc, a, toy_world.scene(1).image) < 0.9999


def test_mask_box():
    m = np.zeros((20, 30), dtype=bool)
    assert mask_box(m) is None
    m[5:15, 10:20] = True
    assert mask_box(m) == (10, 5, 20, 15)
    m[0, 0] = True  # one stray pixel
    assert mask_box(m) == (0, 0, 20, 15)
    assert mask_box(m, trim=0.02) == (10, 5, 20, 15)
