"""`mpp annotate` end to end on toy footage: a video and a cast folder in, a raw layout that prepares
and trains out; resumable, shardable, the contact sheet's edits applied on a rerun, and every bad
input named in the report without losing the rest."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mpp.annotate.__main__ import main
from mpp.annotate.frames import FrameSettings, frames
from mpp.cli import main as fit
from mpp.data.raw import list_sample_ids, load_raw_sample
from mpp.prepare import prepare_dataset
from mpp.toy.codec import PatchCodec
from mpp.toy.footage import write_toy_cast, write_toy_video
from mpp.toy.judge import load_or_train_judge
from mpp.toy.scenes import ToyWorld
from tests.helpers import fit_args

WORLD = ToyWorld(seed=0, num_identities=32)
SHAPES = "square,circle,cross,hexagon"


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory, toy_models):
    """The test bundle's codec and DINOv2 beside a judge trained for a few steps (the toy captioner's)."""
    root = tmp_path_factory.mktemp("annotate_models")
    for sub in ("vae", "dino"):
        shutil.copytree(toy_models / sub, root / sub)
    load_or_train_judge(root / "judge.safetensors", PatchCodec.from_pretrained(root / "vae"), steps=3, pool_size=64)
    return root


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    root = tmp_path_factory.mktemp("footage")
    (root / "videos").mkdir()
    truth = [write_toy_video(str(root / "videos" / f"reel{n}.mp4"), WORLD, list(range(6 * n, 6 * n + 6)),
                             frames_per_shot=4, jitter=0) for n in range(2)]
    cast = [i["identity"] for t in truth for s in t["shots"] for i in s["instances"] if i["foreground"]][:3]
    write_toy_cast(str(root / "cast"), WORLD, sorted(set(cast)))
    return root


def toy_flags(bundle, *extra):
    return ["--detector", "toy", "--captioner", "toy", f"--captioner.model={bundle}", f"--dino={bundle / 'dino'}",
            "--foreground", SHAPES, "--stride", "10", *extra]


def run(footage, raw, bundle, *extra) -> int:
    return main([str(footage / "videos"), str(raw), "--cast", str(footage / "cast"), *toy_flags(bundle, *extra)])


def test_footage_and_a_cast_become_a_raw_layout_that_prepares_and_trains(footage, toy_bundle, toy_models,
                                                                          toy_settings, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    assert run(footage, raw, toy_bundle, "--link_threshold=-1") == 0
    report = json.loads((raw / "annotate/report.json").read_text())
    assert report["frames"] == 12 and report["samples"] == 12
    assert report["dropped_frames"] == [] and report["unreadable_sources"] == []  # --stride 10: a frame a shot
    ids = list_sample_ids(str(raw))
    assert len(ids) == 12 and all(i.startswith("reel") for i, _ in ids)
    samples = [load_raw_sample(str(raw), sid, path, resolution=128) for sid, path in ids]
    assert sum(len(s.instance_captions) for s in samples) == report["instances"]
    refs = [p for s in samples for p in s.reference_paths if p]
    assert refs and all(p.startswith("refs/") and os.path.isfile(raw / p) for p in refs)  # linked, self-contained
    record = json.loads((raw / "captions" / f"{ids[0][0]}.json").read_text())
    assert record["source"].endswith("reel0.mp4") and record["shot"] == 0
    assert set(ToyWorld.tokens(record["caption"])) <= set(WORLD.vocabulary())
    out = str(tmp_path / "prepared")
    result = prepare_dataset(str(raw), out, encoders=toy_settings, resolution=128, progress=False)
    assert not result.errors and len(result.written) == 12
    monkeypatch.chdir(tmp_path)
    cli = fit(fit_args(1, toy_models, out, "--trainer.max_steps=2"))
    assert cli.trainer.global_step == 2


def test_a_rerun_reuses_the_analysis_and_two_shards_equal_one_run(footage, toy_bundle, tmp_path, caplog):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert run(footage, one, toy_bundle) == 0
    first = {p: (one / "captions" / p).read_bytes() for p in sorted(os.listdir(one / "captions"))}
    caplog.set_level("INFO")
    assert run(footage, one, toy_bundle) == 0
    assert any("0 sources analysed now, 2 reused" in r.getMessage() for r in caplog.records)
    assert {p: (one / "captions" / p).read_bytes() for p in first} == first
    for shard in (0, 1):
        assert run(footage, sharded, toy_bundle, "--num_shards=2", f"--shard_index={shard}") == 0
    assert not (sharded / "captions").exists()  # shards analyse; assembly waits for the unsharded run
    assert run(footage, sharded, toy_bundle) == 0
    for name in os.listdir(one / "captions"):
        assert (one / "captions" / name).read_text() == (sharded / "captions" / name).read_text()


def test_the_contact_sheet_edits_name_and_drop_clusters_on_a_rerun(footage, toy_bundle, tmp_path):
    raw = tmp_path / "raw"
    # nothing links (similarity 1 only for a photo's own pixels): every foreground box is unlinked
    assert run(footage, raw, toy_bundle, "--link_threshold=1", "--min_cluster=2", "--cluster_distance=1.5") == 0
    sheet = raw / "annotate/clusters.json"
    doc = json.loads(sheet.read_text())
    assert doc["clusters"] and Image.open(raw / "annotate/contact_sheet.png").size[1] >= 64
    named, dropped = doc["clusters"][0], doc["clusters"][1] if len(doc["clusters"]) > 1 else None
    named["name"] = "hero"
    if dropped:
        dropped["drop"] = True
    sheet.write_text(json.dumps(doc))
    before = json.loads((raw / "annotate/report.json").read_text())["instances"]
    assert run(footage, raw, toy_bundle, "--link_threshold=1", "--clusters", str(sheet)) == 0
    report = json.loads((raw / "annotate/report.json").read_text())
    assert report["linked"] == {"hero": len(named["members"])}
    assert os.path.isfile(raw / "refs/hero" / f"{named['id']}.png")
    if dropped:
        assert len(report["dropped_boxes"]) == len(dropped["members"])
    kept = sum(len(json.loads((raw / "captions" / f).read_text())["instances"]) for f in os.listdir(raw / "captions"))
    assert kept == before - len(report["dropped_boxes"])
    doc["clusters"][0]["members"] = ["reel9-000000#0"]
    sheet.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"--clusters .*boxes this analysis does not have, e.g. \['reel9-000000#0'\]"):
        run(footage, raw, toy_bundle, "--clusters", str(sheet))


def test_bad_inputs_are_named_and_the_rest_is_written(footage, toy_bundle, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(footage / "videos", src)
    (src / "broken.mp4").write_bytes(b"not a video at all")
    Image.fromarray(np.full((96, 96, 3), (215, 190, 140), np.uint8)).save(src / "empty_plate.png")
    cast = tmp_path / "cast"
    shutil.copytree(footage / "cast", cast)
    member = sorted(os.listdir(cast))[0]
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(cast / member / "blank.png")
    raw = tmp_path / "raw"
    code = main([str(src), str(raw), "--cast", str(cast), *toy_flags(toy_bundle)])
    assert code == 1
    report = json.loads((raw / "annotate/report.json").read_text())
    assert [e for e in report["unreadable_sources"] if "broken.mp4" in e and "unreadable video" in e]
    assert report["frames_without_instances"] == ["empty_plate"]
    assert any("blank.png: no instance detected" in s for s in report["cast"]["skipped"])
    assert report["samples"] == 12
    empty = tmp_path / "empty_cast"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"--cast .*empty_cast.*no usable photo"):
        main([str(footage / "videos"), str(tmp_path / "raw2"), "--cast", str(empty), *toy_flags(toy_bundle)])


def test_frames_are_sampled_per_shot_and_near_duplicates_dropped(tmp_path):
    path = str(tmp_path / "v.mp4")
    write_toy_video(path, WORLD, [0, 1, 2], frames_per_shot=8, fps=4, jitter=0)
    got = list(frames([path], FrameSettings(stride=1.0)))
    kept = [f for f in got if hasattr(f, "image")]
    assert [(f.id, f.shot) for f in kept] == [("v-000000", 0), ("v-000008", 1), ("v-000016", 2)]
    assert [d.id for d in got if not hasattr(d, "image")] == ["v-000004", "v-000012", "v-000020"]
    drifting = str(tmp_path / "d.mp4")
    write_toy_video(drifting, WORLD, [0], frames_per_shot=8, fps=4, jitter=3)
    assert [f.id for f in frames([drifting], FrameSettings(stride=1.0)) if hasattr(f, "image")] == [
        "d-000000", "d-000004"]  # the camera moved: not a duplicate
    for flag, settings in (("--stride", {"stride": 0}), ("--cut_threshold", {"cut_threshold": 0}),
                           ("--dup_threshold", {"dup_threshold": 1})):
        with pytest.raises(ValueError, match=flag):
            FrameSettings(**settings)
