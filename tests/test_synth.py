"""mpp synth: prompts → FLUX renders in RAW/synth/frames with their records, resumable and shardable,
through a tiny random FluxPipeline saved to a folder, and the toy bundle through mpp's sampler."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mpp.synth import FluxRenderer, RenderSettings, Sample, main, read_prompts, synth_paths
from tests.helpers import save_tiny_blip, save_tiny_flux_pipeline

FAST = ["--width", "32", "--height", "32", "--steps", "2", "--max_sequence_length", "16", "--device", "cpu",
        "--quiet", "--no_label"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


def synth(prompts, raw, model, *extra) -> int:
    return main([str(prompts), str(raw), "--model", str(model), *FAST, *extra])


def records(raw) -> list[dict]:
    with open(synth_paths(str(raw))[1]) as f:
        return [json.loads(line) for line in f]


def frames(raw) -> dict[str, bytes]:
    folder = synth_paths(str(raw))[0]
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_templates_expand_in_order_or_are_drawn_with_a_seed(tmp_path):
    samples = read_prompts("a {red|blue} car in a {street|field}", seed=5, width=64, height=32)
    assert [s.prompt for s in samples] == ["a red car in a street", "a red car in a field", "a blue car in a street",
                                           "a blue car in a field"]
    assert [(s.id, s.seed, s.width, s.height) for s in samples[:2]] == [("000000", 5, 64, 32), ("000001", 6, 64, 32)]
    drawn = read_prompts("a {|big }{red|blue} car", count=6, seed=1)
    assert drawn == read_prompts("a {|big }{red|blue} car", count=6, seed=1) and len(drawn) == 6
    assert {s.prompt for s in drawn} <= {"a red car", "a blue car", "a big red car", "a big blue car"}
    assert [s.prompt for s in read_prompts("a lone tree", count=3)] == ["a lone tree"] * 3
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\n\na {cat|dog}\n  a house \n")
    assert [s.prompt for s in read_prompts(str(txt))] == ["a cat", "a dog", "a house"]


def test_synth_renders_each_prompt_with_its_seed_and_records_it(tmp_path, flux_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red car", "id": "car"}\n{"prompt": "a blue car", "seed": 42}\n'
                       '{"prompt": "a tree", "width": 48}\n')
    assert synth(prompts, tmp_path / "raw", flux_dir, "--seed", "7") == 0
    got = records(tmp_path / "raw")
    assert [(r["id"], r["prompt"], r["seed"], r["width"], r["height"]) for r in got] == [
        ("car", "a red car", 7, 32, 32), ("000001", "a blue car", 42, 32, 32), ("000002", "a tree", 9, 48, 32)]
    assert all(r["steps"] == 2 and r["guidance"] == 3.5 and r["model"] == os.path.abspath(flux_dir) for r in got)
    assert sorted(frames(tmp_path / "raw")) == ["000001.png", "000002.png", "car.png"]
    # a frame is exactly what the pipeline renders from its recorded prompt and seed
    renderer = FluxRenderer(flux_dir, RenderSettings(steps=2, max_sequence_length=16))
    folder = synth_paths(str(tmp_path / "raw"))[0]
    car = np.asarray(Image.open(os.path.join(folder, "car.png")))
    assert car.shape == (32, 32, 3)
    np.testing.assert_array_equal(car, renderer.render(Sample("car", "a red car", 7, 32, 32)))
    assert not np.array_equal(car, renderer.render(Sample("car", "a red car", 8, 32, 32)))


def test_a_rerun_writes_nothing_new_and_refuses_changed_samples(tmp_path, flux_dir):
    raw = tmp_path / "raw"
    assert synth("a {red|blue} car", raw, flux_dir) == 0
    before, lines = frames(raw), records(raw)
    stamps = {n: os.stat(os.path.join(synth_paths(str(raw))[0], n)).st_mtime_ns for n in before}
    assert synth("a {red|blue} car", raw, flux_dir) == 0
    assert frames(raw) == before and records(raw) == lines
    assert {n: os.stat(os.path.join(synth_paths(str(raw))[0], n)).st_mtime_ns for n in before} == stamps
    os.remove(os.path.join(synth_paths(str(raw))[0], "000001.png"))  # lost: rendered again, the same
    assert synth("a {red|blue} car", raw, flux_dir) == 0
    assert frames(raw) == before and records(raw) == lines
    with pytest.raises(ValueError, match=r"synth.jsonl:1: sample '000000' was rendered with prompt='a red car', "
                                         r"seed=0; this run asks for prompt='a green car', seed=3"):
        synth("a {green|blue} car", raw, flux_dir, "--seed", "3")


def test_two_shards_write_what_one_run_writes(tmp_path, flux_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    assert synth("a {red|blue|green} {car|tree}", one, flux_dir) == 0
    for index in ("1", "0"):  # shards write in any order; labelling is left to a later --label_only
        assert main(["a {red|blue|green} {car|tree}", str(two), "--model", flux_dir, *FAST[:-1],
                     "--num_shards", "2", "--shard_index", index]) == 0
    assert len(frames(one)) == 6 and frames(two) == frames(one)
    assert sorted(records(two), key=lambda r: r["id"]) == records(one)


def test_bad_prompts_and_sizes_are_named(tmp_path, flux_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a car"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs a non-empty string field 'prompt'"):
        synth(bad, tmp_path / "raw", flux_dir)
    bad.write_text('{"prompt": "a car"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        synth(bad, tmp_path / "raw", flux_dir)
    bad.write_text('{"prompt": "a car", "height": 40}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'height' must be a positive multiple of 16 px .*got 40"):
        synth(bad, tmp_path / "raw", flux_dir)
    bad.write_text('{"prompt": "a car", "id": "../x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: id '../x' is not a plain file name"):
        synth(bad, tmp_path / "raw", flux_dir)
    bad.write_text('{"prompt": "a car", "id": "x"}\n{"prompt": "a cat", "id": "X"}\n')
    with pytest.raises(ValueError, match=r"sample 2 repeats the id 'X' of sample 1"):
        synth(bad, tmp_path / "raw", flux_dir)
    (tmp_path / "t.txt").write_text("a car\na {red|blue car\n")
    with pytest.raises(ValueError, match=r"t.txt:2: unbalanced '\{'"):
        synth(tmp_path / "t.txt", tmp_path / "raw", flux_dir)
    with pytest.raises(ValueError, match=r"PROMPTS: no such file '.*missing.txt'"):
        synth(tmp_path / "missing.txt", tmp_path / "raw", flux_dir)
    with pytest.raises(ValueError, match=r"--width must be a positive multiple of 16 px .*got 30"):
        synth("a car", tmp_path / "raw", flux_dir, "--width", "30")
    with pytest.raises(ValueError, match=r"--shard_index must lie in \[0, --num_shards=2\), got 2"):
        synth("a car", tmp_path / "raw", flux_dir, "--num_shards", "2", "--shard_index", "2")
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        synth("a car", tmp_path / "raw", flux_dir, "--steps", "0")
    assert not os.path.exists(tmp_path / "raw")  # nothing written before the inputs were checked


def test_a_missing_model_is_three_lines_naming_the_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        synth("a car", tmp_path / "raw", tmp_path / "empty")
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("model: cannot load a FLUX pipeline")
    assert lines[2].endswith("--model=/path/to/folder")


def test_the_toy_path_renders_through_mpps_sampler(tmp_path, toy_models):
    raw = tmp_path / "raw"
    args = ["a red {square|circle}", str(raw), "--toy", str(toy_models), "--width", "64", "--height", "48",
            "--steps", "2", "--device", "cpu", "--quiet", "--no_label"]
    assert main(args) == 0
    got = records(raw)
    assert [(r["prompt"], r["seed"]) for r in got] == [("a red square", 0), ("a red circle", 1)]
    assert got[0]["model"] == f"toy:{os.path.abspath(toy_models)}"
    images = [np.asarray(Image.open(os.path.join(synth_paths(str(raw))[0], f"{r['id']}.png"))) for r in got]
    assert all(im.shape == (48, 64, 3) for im in images) and not np.array_equal(*images)
    with pytest.raises(ValueError, match=r"--toy: .* is not a toy model bundle"):
        main([args[0], str(tmp_path / "raw2"), "--toy", str(tmp_path), *args[4:]])


def test_label_runs_annotate_with_the_prompts_as_scene_captions(tmp_path, toy_models, toy_world):
    """End to end: the toy path renders, then (`--label_only`, after the flags given after `--`)
    annotate labels the frames. The random toy backbone draws nothing a detector finds, so the frames
    are swapped for toy scenes of the same ids first: what is tested is the hand-over to annotate."""
    blip = save_tiny_blip(tmp_path / "blip")
    raw = tmp_path / "raw"
    render = ["a red {square|circle}", str(raw), "--toy", str(toy_models), "--width", "128", "--height", "128",
              "--steps", "1", "--device", "cpu", "--quiet"]
    assert main([*render, "--no_label"]) == 0
    folder = synth_paths(str(raw))[0]
    for i, name in enumerate(sorted(os.listdir(folder))):
        Image.fromarray(toy_world.scene(i).image).save(os.path.join(folder, name))
    annotate = ["--detector", "toy", "--captioner", "blip", "--captioner.model", blip, "--dino",
                os.path.join(toy_models, "dino")]
    assert main([*render, "--label_only", "--", *annotate]) == 0
    for record in records(raw):
        caption = json.loads((raw / "captions" / f"{record['id']}.json").read_text())
        assert caption["caption"] == record["prompt"] and caption["instances"]
        assert all(inst["caption"] for inst in caption["instances"])  # BLIP's, one per box
        assert list((raw / "images").glob(f"{record['id']}.*"))
