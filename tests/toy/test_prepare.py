"""The toy dataset: `mpp toy prepare` and `ToyData` (the DataModule's data.toy)."""

import json
import shutil

import pytest

from mpp.data.layout import read_manifest
from mpp.datamodule import MppDataModule
from mpp.toy.__main__ import main
from mpp.toy.bundle import toy_encoder_settings
from mpp.toy.codec import PatchCodec
from mpp.toy.prepare import prepare_toy


def test_toy_data_is_prepared_again_when_its_models_change(toy_models, tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    shutil.copytree(toy_models, models)
    prepare_toy(str(data), models_dir=str(models), num_samples=4, pretrain_steps=0, progress=False)
    before = {r["id"]: r for r in read_manifest(str(data / "manifest.jsonl"))}
    codec = PatchCodec.from_pretrained(models, subfolder="vae")
    codec.channel_std.mul_(2.0)
    codec.save_pretrained(models / "vae")
    result = prepare_toy(str(data), models_dir=str(models), num_samples=4, pretrain_steps=0, progress=False)
    assert sorted(result.written) == sorted(before)  # every sample encoded again, none kept
    info = json.loads((data / "prepare.json").read_text())
    assert info["encoders"] == toy_encoder_settings(str(models)).identity()


def test_prepare_is_a_toy_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0 and "--models_dir" in capsys.readouterr().out


def test_a_moved_copy_of_models_and_data_is_the_same_dataset(toy_models, tmp_path, caplog):
    models, data = tmp_path / "a/models", tmp_path / "a/data"
    shutil.copytree(toy_models, models)
    prepare_toy(str(data), models_dir=str(models), num_samples=4, pretrain_steps=0, progress=False)
    manifest = (data / "manifest.jsonl").read_bytes()
    shutil.move(tmp_path / "a", tmp_path / "b")  # the whole project folder moved elsewhere
    moved_models, moved_data = tmp_path / "b/models", tmp_path / "b/data"
    result = prepare_toy(str(moved_data), models_dir=str(moved_models), num_samples=4, pretrain_steps=0,
                         progress=False)
    assert result.written == [] and (moved_data / "manifest.jsonl").read_bytes() == manifest
    assert "preparing it again" not in caplog.text
    settings = toy_encoder_settings(str(moved_models))
    MppDataModule(root=str(moved_data), encoders=settings, resolution=128, val_fraction=0.25).setup("fit")


def test_a_widescreen_toy_world_is_prepared_into_one_bucket_per_ratio(toy_models, tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    shutil.copytree(toy_models, models)
    result = prepare_toy(str(data), models_dir=str(models), num_samples=9, pretrain_steps=0, progress=False,
                         aspect_ratios=[1.0, 16 / 9, 2.39])
    assert not result.errors and sum(result.buckets.values()) == 9
    assert set(result.buckets) <= {(128, 128), (176, 96), (192, 80)} and len(result.buckets) > 1
    assert json.loads((data / "prepare.json").read_text())["buckets"] == [[128, 128], [176, 96], [192, 80]]
    assert json.loads((data / "source/toy.json").read_text())["aspect_ratios"] == [1.0, 16 / 9, 2.39]


def test_a_toy_world_that_names_only_shapes_is_recorded_and_not_mixed_with_another(toy_models, tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    shutil.copytree(toy_models, models)
    result = prepare_toy(str(data), models_dir=str(models), num_samples=6, pretrain_steps=0, progress=False,
                         describe_prob=0.0)
    assert not result.errors
    assert json.loads((data / "source/toy.json").read_text())["describe_prob"] == 0.0
    captions = [json.loads(p.read_text()) for p in sorted((data / "source/captions").glob("*.json"))]
    characters = [i["caption"] for c in captions for i in c["instances"] if i["foreground"]]
    assert characters and all(len(c.split()) == 2 for c in characters)  # "a cross": the shape only
    with pytest.raises(ValueError, match="describe_prob"):  # the same folder asked for another world
        prepare_toy(str(data), models_dir=str(models), num_samples=6, pretrain_steps=0, progress=False)


def test_a_toy_world_of_larger_boxes_gets_models_built_for_it(toy_models, tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    shutil.copytree(toy_models, models)
    result = prepare_toy(str(data), models_dir=str(models), num_samples=4, pretrain_steps=0, progress=False,
                         min_box=48, max_box=96)
    assert not result.errors
    assert json.loads((data / "source/toy.json").read_text())["boxes"] == [48, 96]
    marker = json.loads((models / "mpp_toy.json").read_text())
    assert (marker["world"]["min_box"], marker["world"]["max_box"]) == (48, 96)
    sides = [s for p in (data / "source/captions").glob("*.json") for i in json.loads(p.read_text())["instances"]
             for s in (i["bbox"][2] - i["bbox"][0], i["bbox"][3] - i["bbox"][1])]
    assert sides and min(sides) >= 48 and max(sides) <= 96
