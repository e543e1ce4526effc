import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mpp.cli import main as cli_main
from mpp.__main__ import main as mpp_main
from mpp.generate import read_layouts, sample_latents
from tests.helpers import toy_conditioning
from tests.test_training import fit_args


def test_read_layouts_reports_bad_lines_by_number(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ref.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        {"id": "a", "prompt": "a red square", "instances": [{"bbox": [0.1, 0.1, 0.5, 0.5], "caption": "a red square", "reference": "ref.png"}]},
        {"id": "b", "prompt": "x"},
        {"id": "c", "prompt": "x", "instances": [{"bbox": [10, 10, 300, 40]}]},
        {"id": "d", "prompt": "x", "instances": [{"bbox": [0.1, 0.1, 0.2, 0.2], "reference": "missing.png"}]},
        {"id": "e", "prompt": "x", "instances": [{"bbox": [0.1, 0.1, 0.2, 0.2], "reference": "broken.png"}]},
        {"id": "f", "prompt": "two boxes in pixels", "instances": [{"bbox": [0, 0, 64, 64]}, {"bbox": [64, 64, 128, 128]}]},
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


def test_generate_end_to_end_from_a_toy_checkpoint(tmp_path, monkeypatch, toy_models, toy_prepared, toy_world):
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
           {"id": "shot4", "prompt": "x", "instances": [{"bbox": [0.1, 0.1, 0.5, 0.5], "reference": "nowhere.png"}]}]
    (tmp_path / "layouts.jsonl").write_text("\n".join(json.dumps(x) for x in [bad[0], good, *bad[1:], {**good, "id": "shot5"}]) + "\n")
    flags = [a for a in args[1:]]  # the same configs and flags as the training run
    configs = [flags[i + 1] for i, a in enumerate(flags) if a == "--config"]
    overrides = [a for a in flags if a.startswith("--") and a != "--config" and "=" in a]
    out = tmp_path / "out"
    assert mpp_main(["generate", *[x for c in configs for x in ("--config", c)], "--ckpt", str(ckpt),
                     "--layouts", "layouts.jsonl", "--out", str(out), "--steps", "2", *overrides]) == 0
    report = json.load(open(out / "generated.json"))
    assert [r["id"] for r in report["images"]] == ["shot1", "shot5"]
    assert [e.split(":")[1] for e in report["errors"]] == ["1", "3", "4"]
    for name in ("shot1.png", "shot1_boxes.png", "shot5.png"):
        assert Image.open(out / name).size == (128, 128)
    assert len(report["images"][0]["alpha"]) == len(scene.instances)

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
    no_ckpt = [a for a in predict if not a.startswith("--ckpt_path")]
    with pytest.raises(ValueError, match="--ckpt_path"):
        cli_main(no_ckpt)
    with pytest.raises(ValueError, match="--data.predict_file"):
        cli_main([a for a in predict if not a.startswith("--data.predict_file")])


def test_layout_guidance_extrapolates_from_the_same_model_without_instances(toy_models, toy_settings):
    from mpp.encoders import embedding_dims
    from mpp.nn import MppFlux, build_backbone

    torch.manual_seed(0)
    model = MppFlux(build_backbone(toy_models), **embedding_dims(toy_settings), lora_rank=4).eval()
    with torch.no_grad():  # give the zero-initialized projections weight, so the layout changes the output
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    batch = toy_conditioning(1, 2, g, txt_len=8)
    noise = torch.randn(1, 16, 16, 16, generator=g)
    t = torch.ones(1)
    with torch.no_grad():
        v = model(latents=noise, timesteps=t, guidance=torch.full_like(t, 3.5), **batch).velocity
        v0 = model(latents=noise, timesteps=t, guidance=torch.full_like(t, 3.5),
                   **{**batch, "instance_mask": torch.zeros(1, 2, dtype=torch.bool)}).velocity
    guided = sample_latents(model, batch, noise, steps=1, shift=None, guidance=3.5, layout_guidance=3.0)
    assert (v - v0).abs().max() > 1e-3  # the layout matters, so the check below can fail
    torch.testing.assert_close(guided, noise - (v0 + 3.0 * (v - v0)), rtol=1e-4, atol=1e-5)
