import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mpp.prepare as prepare_mod
from mpp.data.buckets import Buckets
from mpp.data.layout import file_sha256, read_manifest, sample_path
from mpp.prepare import merge_shards, prepare_dataset
from tests.helpers import TOY_SIZE, WIDE_BUCKETS


def test_round_trip_shapes_dtypes_boxes_hashes(toy_prepared, toy_raw, toy_settings):
    records = read_manifest(os.path.join(toy_prepared, "manifest.jsonl"))
    assert len(records) == 24
    info = json.load(open(os.path.join(toy_prepared, "prepare.json")))
    assert info["resolution"] == TOY_SIZE and info["encoders"]["flux"] == toy_settings.flux
    for r in records:
        for kind, digest in r["files"].items():
            assert file_sha256(sample_path(toy_prepared, kind, r["id"])) == digest
        lat = load_file(sample_path(toy_prepared, "latents", r["id"]))["latents"]
        assert lat.dtype == torch.float16 and list(lat.shape) == r["latent_shape"] == [16, TOY_SIZE // 8, TOY_SIZE // 8]
        n = r["num_instances"]
        cap = json.load(open(sample_path(toy_prepared, "caption", r["id"])))
        raw = json.load(open(os.path.join(toy_raw, "captions", r["id"] + ".json")))
        assert cap["num_instances"] == n == len(raw["instances"])
        for inst, src in zip(cap["instances"], raw["instances"], strict=True):
            assert [round(v * TOY_SIZE, 3) for v in inst["bbox"]] == pytest.approx(src["bbox"], abs=1e-3)
        assert load_file(sample_path(toy_prepared, "clip", r["id"]))["embeds"].shape == (n, 32)
        assert load_file(sample_path(toy_prepared, "dino", r["id"]))["embeds"].shape == (n, 64)
        text = load_file(sample_path(toy_prepared, "text", r["id"]))
        assert text["prompt_embeds"].shape == (32, 32) and text["pooled_prompt_embeds"].shape == (32,)
        assert text["instance_embeds"].shape == (n, 32)
        assert all(t.dtype == torch.float16 for t in text.values())


def test_buckets_are_recorded_and_the_summary_counts_what_the_crops_did(toy_wide_prepared, toy_wide_raw,
                                                                        toy_settings, tmp_path, caplog):
    info = json.load(open(os.path.join(toy_wide_prepared, "prepare.json")))
    assert info["buckets"] == [[128, 128], [176, 96], [192, 80]]
    records = read_manifest(os.path.join(toy_wide_prepared, "manifest.jsonl"))
    for r in records:
        w, h = r["bucket"]
        assert [r["width"], r["height"]] == [w, h] and r["latent_shape"] == [16, h // 8, w // 8]
        raw_w, raw_h = r["source_size"]
        assert (w > h) == (raw_w > raw_h)
    assert {tuple(r["bucket"]) for r in records} == {(128, 128), (176, 96), (192, 80)}

    # squares only: the 2.39:1 frames lose most of their width, and the instances there are dropped, counted
    with caplog.at_level("INFO", logger="mpp.prepare"):
        result = prepare_dataset(toy_wide_raw, str(tmp_path / "square"), encoders=toy_settings, resolution=TOY_SIZE,
                                 buckets=Buckets(aspect_ratios=[1.0]), progress=False, require_instances=False)
    squares = read_manifest(str(tmp_path / "square" / "manifest.jsonl"))
    assert result.dropped == sum(len(r["dropped_instances"]) for r in squares) > 0
    assert result.clipped == sum(len(r["clipped_instances"]) for r in squares) > 0
    assert dict(result.buckets) == {(128, 128): 30}
    assert f"{result.dropped} dropped because the crop left them" in caplog.text and "128×128: 30" in caplog.text
    wide = prepare_dataset(toy_wide_raw, str(tmp_path / "wide"), encoders=toy_settings, resolution=TOY_SIZE,
                           buckets=WIDE_BUCKETS, progress=False)
    assert wide.dropped < result.dropped  # buckets keep what the square crop threw away
    with pytest.raises(ValueError, match="prepared with other settings"):  # resuming asks for the same buckets
        prepare_dataset(toy_wide_raw, str(tmp_path / "wide"), encoders=toy_settings, resolution=TOY_SIZE,
                        progress=False)


def test_reference_image_is_embedded_not_the_box_crop(toy_prepared, toy_raw):
    """A foreground instance with a reference gets the reference's embedding: the same identity
    has the same embedding in every scene."""
    by_ref: dict[str, list[torch.Tensor]] = {}
    for r in read_manifest(os.path.join(toy_prepared, "manifest.jsonl")):
        cap = json.load(open(sample_path(toy_prepared, "caption", r["id"])))
        dino = load_file(sample_path(toy_prepared, "dino", r["id"]))["embeds"]
        for k, inst in enumerate(cap["instances"]):
            if inst["reference"]:
                by_ref.setdefault(inst["reference"], []).append(dino[k])
    repeated = [v for v in by_ref.values() if len(v) > 1]
    assert repeated, "the toy world should repeat identities across scenes"
    for v in repeated:
        assert all(torch.equal(v[0], x) for x in v[1:])


def _copy_raw(toy_raw, tmp_path, n=6):
    dst = tmp_path / "raw"
    (dst / "images").mkdir(parents=True)
    (dst / "captions").mkdir()
    shutil.copytree(os.path.join(toy_raw, "refs"), dst / "refs")
    ids = sorted(f[:-4] for f in os.listdir(os.path.join(toy_raw, "images")))[:n]
    for i in ids:
        shutil.copy(os.path.join(toy_raw, "images", i + ".png"), dst / "images")
        shutil.copy(os.path.join(toy_raw, "captions", i + ".json"), dst / "captions")
    return dst, ids


def test_resume_after_interruption(toy_raw, toy_settings, tmp_path, monkeypatch):
    raw, ids = _copy_raw(toy_raw, tmp_path)
    out = str(tmp_path / "out")
    real_write = prepare_mod.write_sample
    calls = []

    def crash_on_fourth(output, s, tensors, dtype):
        calls.append(s.id)
        if len(calls) == 4:  # dies after writing some of the sample's files
            torch_file = sample_path(output, "latents", s.id)
            os.makedirs(os.path.dirname(torch_file), exist_ok=True)
            open(torch_file, "wb").write(b"partial")
            dino = sample_path(output, "dino", s.id)  # and the temporary of the write a SIGKILL cut short
            os.makedirs(os.path.dirname(dino), exist_ok=True)
            open(os.path.join(os.path.dirname(dino), f".tmp-{os.path.basename(dino)}"), "wb").write(b"x" * 328)
            raise KeyboardInterrupt
        return real_write(output, s, tensors, dtype)

    monkeypatch.setattr(prepare_mod, "write_sample", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(str(raw), out, encoders=toy_settings, resolution=TOY_SIZE, progress=False)
    monkeypatch.setattr(prepare_mod, "write_sample", real_write)
    assert [r["id"] for r in read_manifest(os.path.join(out, "manifest.jsonl"))] == ids[:3]

    # a finished sample whose file was damaged afterwards is redone too
    open(sample_path(out, "dino", ids[0]), "ab").write(b"x")
    result = prepare_dataset(str(raw), out, encoders=toy_settings, resolution=TOY_SIZE, progress=False)
    assert result.skipped == ids[1:3]
    assert sorted(result.written) == sorted([ids[0]] + ids[3:])
    assert not [f for _, _, files in os.walk(out) for f in files if f.startswith(".tmp-")]

    clean = str(tmp_path / "clean")
    prepare_dataset(str(raw), clean, encoders=toy_settings, resolution=TOY_SIZE, progress=False)

    def by_id(root):
        return {r["id"]: r for r in read_manifest(os.path.join(root, "manifest.jsonl"))}

    assert by_id(out) == by_id(clean)


def test_sharded_then_merged_equals_unsharded(toy_raw, toy_settings, tmp_path):
    raw, ids = _copy_raw(toy_raw, tmp_path, n=7)
    whole, sharded = str(tmp_path / "whole"), str(tmp_path / "sharded")
    prepare_dataset(str(raw), whole, encoders=toy_settings, resolution=TOY_SIZE, progress=False)
    for i in range(3):
        prepare_dataset(str(raw), sharded, encoders=toy_settings, resolution=TOY_SIZE, progress=False,
                        num_shards=3, shard_index=i)
    assert merge_shards(sharded) == 7
    assert open(os.path.join(whole, "manifest.jsonl")).read() == open(os.path.join(sharded, "manifest.jsonl")).read()
    for r in read_manifest(os.path.join(whole, "manifest.jsonl")):
        for kind in r["files"]:
            with open(sample_path(whole, kind, r["id"]), "rb") as a:
                with open(sample_path(sharded, kind, r["id"]), "rb") as b:
                    assert a.read() == b.read()


def test_other_encoder_settings_are_refused(toy_prepared, toy_settings, toy_raw, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(toy_prepared, out)
    other = type(toy_settings)(**{**toy_settings.to_dict(), "crop_margin": 0.3})
    with pytest.raises(ValueError, match="prepared with other settings") as e:
        prepare_dataset(toy_raw, str(out), encoders=other, resolution=TOY_SIZE, progress=False)
    assert "0.3" in str(e.value) and "0.1" in str(e.value)


def test_encoder_weights_changed_in_place_are_refused(toy_prepared, toy_models, tmp_path):
    """Same folders, re-fitted VAE: the dataset's latents are stale, and the datamodule says so."""
    from mpp.datamodule import MppDataModule
    from mpp.toy.bundle import toy_encoder_settings
    from mpp.toy.codec import PatchCodec

    models = tmp_path / "models"
    shutil.copytree(toy_models, models)
    settings = toy_encoder_settings(str(models))
    data = tmp_path / "data"
    shutil.copytree(toy_prepared, data)
    info = json.loads((data / "prepare.json").read_text())
    info["encoders"] = settings.identity()
    (data / "prepare.json").write_text(json.dumps(info))
    MppDataModule(root=str(data), encoders=settings, resolution=TOY_SIZE, val_fraction=0.2).setup("fit")  # accepted

    codec = PatchCodec.from_pretrained(models, subfolder="vae")
    codec.channel_std.mul_(2.0)
    codec.save_pretrained(models / "vae")
    with pytest.raises(ValueError, match="prepared with other settings") as e:
        MppDataModule(root=str(data), encoders=toy_encoder_settings(str(models)), resolution=TOY_SIZE,
                      val_fraction=0.2).setup("fit")
    assert "flux/vae" in str(e.value)


# ---- bad inputs: one test per case, each names the file and the good samples still come out ----

def _bad_case(toy_raw, settings, tmp_path, damage):
    raw, ids = _copy_raw(toy_raw, tmp_path, n=3)
    bad = ids[1]
    damage(raw, bad)
    out = str(tmp_path / "out")
    result = prepare_dataset(str(raw), out, encoders=settings, resolution=TOY_SIZE, progress=False)
    assert sorted(result.written) == [ids[0], ids[2]]
    assert [i for i, _ in result.errors] == [bad]
    with pytest.raises(ValueError) as stopped:
        prepare_dataset(str(raw), str(tmp_path / "stop"), encoders=settings, resolution=TOY_SIZE,
                        progress=False, on_error="stop")
    assert str(stopped.value) == result.errors[0][1]
    return result.errors[0][1], raw, bad


def _edit_caption(raw, sid, edit):
    path = raw / "captions" / f"{sid}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_unreadable_image(toy_raw, toy_settings, tmp_path):
    def damage(raw, sid):
        (raw / "images" / f"{sid}.png").write_bytes(b"not a png")

    msg, raw, bad = _bad_case(toy_raw, toy_settings, tmp_path, damage)
    assert msg.startswith(str(raw / "images" / f"{bad}.png")) and "unreadable image" in msg


def test_missing_caption_file(toy_raw, toy_settings, tmp_path):
    def damage(raw, sid):
        (raw / "captions" / f"{sid}.json").unlink()

    msg, raw, bad = _bad_case(toy_raw, toy_settings, tmp_path, damage)
    assert msg.startswith(str(raw / "captions" / f"{bad}.json")) and "missing caption file" in msg


def test_box_outside_image(toy_raw, toy_settings, tmp_path):
    def damage(raw, sid):
        _edit_caption(raw, sid, lambda d: d["instances"][0].update(bbox=[10, 10, 500, 40]))

    msg, raw, bad = _bad_case(toy_raw, toy_settings, tmp_path, damage)
    assert str(raw / "captions" / f"{bad}.json") in msg
    assert "instance 0 bbox [10, 10, 500, 40] lies outside the image" in msg


def test_zero_area_box(toy_raw, toy_settings, tmp_path):
    def damage(raw, sid):
        _edit_caption(raw, sid, lambda d: d["instances"][0].update(bbox=[10, 10, 10, 40]))

    msg, raw, bad = _bad_case(toy_raw, toy_settings, tmp_path, damage)
    assert str(raw / "captions" / f"{bad}.json") in msg and "has zero area" in msg


def test_empty_instance_list(toy_raw, toy_settings, tmp_path):
    def damage(raw, sid):
        _edit_caption(raw, sid, lambda d: d.update(instances=[]))

    msg, raw, bad = _bad_case(toy_raw, toy_settings, tmp_path, damage)
    assert str(raw / "captions" / f"{bad}.json") in msg and "empty instance list" in msg


def test_missing_reference(toy_raw, toy_settings, tmp_path):
    def damage(raw, sid):
        _edit_caption(raw, sid, lambda d: d["instances"][0].update(reference="refs/nobody.png"))

    msg, raw, bad = _bad_case(toy_raw, toy_settings, tmp_path, damage)
    assert str(raw / "refs" / "nobody.png") in msg and "does not exist" in msg


def test_empty_instances_allowed_when_not_required(toy_raw, toy_settings, tmp_path):
    raw, ids = _copy_raw(toy_raw, tmp_path, n=2)
    _edit_caption(raw, ids[0], lambda d: d.update(instances=[]))
    out = str(tmp_path / "out")
    result = prepare_dataset(str(raw), out, encoders=toy_settings, resolution=TOY_SIZE, progress=False,
                             require_instances=False)
    assert sorted(result.written) == ids and not result.errors
    assert load_file(sample_path(out, "clip", ids[0]))["embeds"].shape[0] == 0


def test_cli_runs_and_merges(toy_raw, toy_settings, tmp_path):
    raw, ids = _copy_raw(toy_raw, tmp_path, n=4)
    out = str(tmp_path / "out")
    enc = [f"--encoders.{k}={v}" for k, v in toy_settings.to_dict().items() if v is not None]
    for i in range(2):
        prepare_mod.main(["run", str(raw), out, f"--resolution={TOY_SIZE}",
                          "--num_shards=2", f"--shard_index={i}", "--progress=false", *enc])
    prepare_mod.main(["merge", out])
    assert [r["id"] for r in read_manifest(os.path.join(out, "manifest.jsonl"))] == ids


def test_two_workers_skip_and_name_bad_samples_as_one_process_does(toy_raw, toy_settings, tmp_path):
    raw, ids = _copy_raw(toy_raw, tmp_path, n=4)
    (raw / "images" / f"{ids[1]}.png").write_bytes(b"not a png")
    _edit_caption(raw, ids[2], lambda d: d["instances"][0].update(bbox=[10, 10, 10, 40]))
    results = [prepare_dataset(str(raw), str(tmp_path / f"out{n}"), encoders=toy_settings, resolution=TOY_SIZE,
                               progress=False, num_workers=n) for n in (0, 2)]
    assert [i for i, _ in results[1].errors] == [ids[1], ids[2]] and sorted(results[1].written) == [ids[0], ids[3]]
    assert results[1].errors == results[0].errors  # the same messages, naming the files


@pytest.mark.timeout(120)
def test_a_fifo_in_place_of_an_image_is_named_not_read(toy_raw, toy_settings, tmp_path):
    def damage(raw, sid):
        (raw / "images" / f"{sid}.png").unlink()
        os.mkfifo(raw / "images" / f"{sid}.png")  # reading it would block for ever

    msg, raw, bad = _bad_case(toy_raw, toy_settings, tmp_path, damage)
    assert msg == f"{raw / 'images' / f'{bad}.png'}: not a regular file (a FIFO, device, socket or folder)"
