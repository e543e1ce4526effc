"""The toy bundle that ships with mpp: it is the one configs/toy.yaml asks for, a build copies it
instead of training, `--overwrite` trains instead, and an edited shipped file is named."""

import hashlib
import logging
import os

import pytest

import mpp.toy.models as models
import mpp.toy.shipped as shipped
from mpp.toy.__main__ import main as toy_main
from mpp.toy.__main__ import overlay_toy_data
from mpp.toy.models import build_toy_models
from mpp.toy.shipped import MANIFEST_NAME, copy_shipped, read_manifest, read_marker, ship_bundle
from tests.helpers import ROOT

TOY = os.path.join(ROOT, "configs/toy.yaml")


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def test_the_shipped_bundle_is_the_one_configs_toy_yaml_asks_for_and_matches_its_manifest(tmp_path):
    toy = overlay_toy_data(TOY)
    wanted = models._marker(toy.bundle_world(), toy.seed, 256, toy.pretrain_steps, toy.vision_steps)
    assert read_marker(shipped.SHIPPED_DIR) == wanted, (
        "configs/toy.yaml (or the toy models' recipe) asks for another bundle than mpp/toy/pretrained: build it "
        "(python -m mpp.toy models DIR --config configs/toy.yaml --overwrite), rerun the toy benchmarks on it, "
        "then python -m mpp.toy ship DIR")
    assert copy_shipped(tmp_path, wanted)
    assert _hashes(tmp_path) == read_manifest()["files"] == _hashes(shipped.SHIPPED_DIR)


def test_a_build_for_the_shipped_marker_copies_it_instead_of_training(tmp_path, monkeypatch, caplog):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the shipped bundle was built for this marker")

    monkeypatch.setattr(models, "_pretrain_vision", no_training)
    monkeypatch.setattr(models, "_pretrain", no_training)
    toy = overlay_toy_data(TOY)
    with caplog.at_level(logging.INFO, logger="mpp.toy.models"):
        path = build_toy_models(tmp_path / "models", world=toy.bundle_world(), pretrain_steps=toy.pretrain_steps,
                                vision_steps=toy.vision_steps)
    assert _hashes(path) == read_manifest()["files"]
    assert any("copying the bundle that ships with mpp" in r.getMessage() for r in caplog.records)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".models.")]  # no temporary left


def test_overwrite_trains_the_bundle_here_and_ship_makes_it_the_shipped_one(tmp_path, monkeypatch, toy_models,
                                                                              toy_world, caplog):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "pretrained")
    toy_main(["ship", str(toy_models), "--note", "the test's bundle"])
    assert read_manifest()["note"] == "the test's bundle" and _hashes(tmp_path / "pretrained") == _hashes(toy_models)
    with caplog.at_level(logging.INFO, logger="mpp.toy.models"):
        build_toy_models(tmp_path / "copied", world=toy_world)
        build_toy_models(tmp_path / "built", world=toy_world, overwrite=True)
    said = [r.getMessage() for r in caplog.records if r.name == "mpp.toy.models"]
    assert any("copying" in m and str(tmp_path / "copied") in m for m in said)
    assert any(m.startswith(f"building the toy models in {tmp_path / 'built'}") for m in said)
    assert _hashes(tmp_path / "copied") == _hashes(tmp_path / "built")  # the same deterministic build


def test_an_edited_shipped_file_is_named_and_another_marker_is_not_copied(tmp_path, monkeypatch, toy_models):
    ship_bundle(toy_models, tmp_path / "pretrained")
    marker = read_marker(toy_models)
    assert not copy_shipped(tmp_path / "a", {**marker, "seed": 1}, tmp_path / "pretrained")
    edited = tmp_path / "pretrained" / "dino" / "config.json"
    edited.write_text(edited.read_text().replace("{", "{ ", 1))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=f"{edited}: not the file .*MANIFEST.json lists"):
        copy_shipped(tmp_path / "b", marker, tmp_path / "pretrained")


def test_overlay_without_toy_data_is_named(tmp_path):
    (tmp_path / "plain.yaml").write_text("model:\n  lr: 1.0\n")
    with pytest.raises(ValueError, match="plain.yaml: sets no data.toy"):
        overlay_toy_data(str(tmp_path / "plain.yaml"))
