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


# ---- open-vocabulary detectors and the CLIP crop–caption score, with tiny random models


@pytest.fixture(scope="module")
def tiny_open_models(tmp_path_factory) -> dict[str, str]:
    from tests.helpers import save_tiny_clip, save_tiny_grounding_dino, save_tiny_owlv2

    root = tmp_path_factory.mktemp("tiny_open_models")
    return {"grounding-dino": save_tiny_grounding_dino(root / "gdino"), "owlv2": save_tiny_owlv2(root / "owlv2"),
            "clip": save_tiny_clip(root / "clip")}


def _generated_folder(root, world, indices) -> tuple[str, str]:
    """A folder as mpp generate writes it (images and generated.json) for toy scenes `indices`, and
    the layouts JSONL they came from, with captions, colours and references."""
    import json

    from PIL import Image

    from mpp.layouts import REPORT_NAME

    records, lines = [], []
    for i in indices:
        scene = world.scene(i)
        h, w = scene.image.shape[:2]
        Image.fromarray(scene.image).save(root / f"s{i}.png")
        Image.fromarray(scene.image[: h // 2, : w // 2]).save(root / f"ref{i}.png")
        records.append({"id": f"s{i}", "image": f"s{i}.png", "boxes": [
            [b.bbox[0] / w, b.bbox[1] / h, b.bbox[2] / w, b.bbox[3] / h] for b in scene.instances]})
        lines.append(json.dumps({"id": f"s{i}", "prompt": scene.caption, "instances": [
            {"bbox": list(b.bbox), "caption": b.caption, "color": list(b.color), "reference": f"ref{i}.png"}
            for b in scene.instances]}))
    (root / REPORT_NAME).write_text(json.dumps({"images": records}))
    (root / "layouts.jsonl").write_text("\n".join(lines) + "\n")
    return str(root), str(root / "layouts.jsonl")


@pytest.mark.parametrize("kind", ["grounding-dino", "owlv2"])
def test_cli_with_an_open_vocabulary_detector_writes_its_json(kind, tiny_open_models, toy_world, tmp_path, capsys):
    import json

    from mpp.evaluate import main

    generated, layouts = _generated_folder(tmp_path, toy_world, range(3))
    out = tmp_path / "scores.json"
    assert main(["--generated", generated, "--layouts", layouts, "--detector", kind,
                 "--detector_model", tiny_open_models[kind], "--detector.score_threshold", "0.0",
                 "--detector.text_threshold", "0.0", "--detector.min_box", "0", "--detector.device", "cpu",
                 "--clip_model", tiny_open_models["clip"], "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert result == printed
    assert result["images"] == 3 and result["instances"] == sum(len(toy_world.scene(i).instances) for i in range(3))
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["success_at_0.5"] <= 1.0
    assert -1.0 <= result["clip_text_similarity"] <= 1.0 and 0 < result["color_histogram_similarity"] <= 1
    assert result["detector"] == f"{kind}:{tiny_open_models[kind]}"


def test_cli_without_clip_model_notes_the_skipped_score(toy_world, tmp_path, capsys):
    import json

    from mpp.evaluate import main

    generated, layouts = _generated_folder(tmp_path, toy_world, [5])
    assert main(["--generated", generated, "--layouts", layouts]) == 0  # --detector toy, the default
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "clip_text_similarity" not in result and result["miou"] > 0.8 and result["detector"] == "toy"
    assert "no --clip_model" in captured.err


def test_an_open_vocabulary_detector_that_finds_nothing_scores_zero(tiny_open_models, toy_world):
    from mpp.detect import DetectSettings, load_detector

    images, layouts = _layouts(toy_world, range(2))
    blind = load_detector("owlv2", DetectSettings(model=tiny_open_models["owlv2"], min_box=1000, device="cpu"))
    result = evaluate(images, layouts, blind)
    assert result["miou"] == 0.0 and result["success_at_0.5"] == 0.0
    assert result["instances"] == sum(len(x["instances"]) for x in layouts.values())


def test_clip_text_scorer(tiny_open_models, toy_world):
    from mpp.evaluate import ClipTextScorer

    clip = ClipTextScorer(tiny_open_models["clip"], device="cpu")
    crop = toy_world.scene(0).image[10:60, 20:90]
    a = clip.score(crop, "a teal dotted cross")
    assert -1.0 <= a <= 1.0 and clip.score(crop, "a teal dotted cross") == a
    assert clip.score(crop, "a red striped circle") != a
    images, layouts = _layouts(toy_world, range(2))
    scored = evaluate(images, layouts, ToyColorDetector(), clip=clip, progress=False)
    assert -1.0 <= scored["clip_text_similarity"] <= 1.0


@pytest.mark.parametrize("flag, what", [("--clip_model", "clip_model: cannot load the CLIP model"),
                                        ("--detector_model", "detector.model: cannot load the grounding-dino")])
def test_a_missing_model_folder_is_a_three_line_error_naming_the_flag(flag, what, toy_world, tmp_path):
    from mpp.evaluate import main

    generated, layouts = _generated_folder(tmp_path, toy_world, [0])
    detector = ["--detector", "grounding-dino"] if flag == "--detector_model" else []
    with pytest.raises(ValueError) as e:
        main(["--generated", generated, "--layouts", layouts, *detector, flag, str(tmp_path / "missing")])
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith(what)
    assert f"--{what.split(':')[0]}=/path/to/folder" in lines[2]


@pytest.mark.parametrize("args, message", [
    (["--detector", "owlv2", "--detector.score_threshold", "1.5"], r"--detector\.score_threshold must be in \[0, 1\)"),
    (["--detector", "grounding-dino", "--detector.nms_iou", "0"], r"--detector\.nms_iou must be in \(0, 1\]"),
    (["--detector", "owlv2", "--detector.min_box", "-2"], r"--detector\.min_box must be ≥ 0"),
    (["--detector.model", "x"], r"--detector\.model: for --detector grounding-dino or owlv2; --detector toy"),
    (["--detector.dtype", "float8"], r"--detector\.dtype must be one of"),
])
def test_bad_detector_flags_are_refused_naming_the_flag(args, message, toy_world, tmp_path):
    from mpp.evaluate import main

    generated, layouts = _generated_folder(tmp_path, toy_world, [0])
    with pytest.raises(ValueError, match=message):
        main(["--generated", generated, "--layouts", layouts, *args])
