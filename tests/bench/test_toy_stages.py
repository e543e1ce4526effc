"""bench/toy_stages.py: each arm runs the recipe `./train.sh --config configs/toy.yaml` runs; an arm never
trains into a folder that holds an earlier run's checkpoints; the held-out cast is unseen and named by its
shape alone."""

from __future__ import annotations

import os

import pytest

from mpp.cli import MppCLI
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule
from mpp.toy.scenes import ToyWorld
from tests.helpers import ROOT, load_bench

# what the bench may set beyond the recipe: its folders and step budget (the checkpoint it starts from
# is --ckpt_path, as scripts/stage.sh passes it)
BENCH_KEYS = ("config", "trainer.max_steps", "data.root", "data.toy.models_dir", "model.backbone",
              "data.encoders.flux", "data.encoders.clip_vision", "data.encoders.dino", "model.encoders")


def _resolved(args: list[str]) -> dict:
    assert args[0] == "fit"
    cfg = MppCLI(MppModule, MppDataModule, run=False, args=args[1:]).config.as_dict()
    for key in BENCH_KEYS:
        *parents, last = key.split(".")
        node = cfg
        for k in parents:
            node = node[k]
            node = node.get("init_args", node)  # a class-typed group (data.encoders, data.toy)
        node.pop(last)
    return cfg


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_arm_runs_what_train_sh_runs_with_the_toy_overlay(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = load_bench("toy_stages")
    arm = bench.arm_args(stage, 1234, root=str(tmp_path / "bench"), models=str(tmp_path / "models"), ckpt=None,
                         extra=[])
    # scripts/stage.sh: python main.py fit --config configs/stage{N}.yaml [--ckpt_path ...] --config configs/toy.yaml
    shipped = ["fit", "--config", os.path.join(ROOT, f"configs/stage{stage}.yaml"),
               "--config", os.path.join(ROOT, "configs/toy.yaml")]
    got, want = _resolved(arm), _resolved(shipped)
    assert got == want
    assert want["model"]["lr"] == 1e-3
    if stage == 2:  # configs/toy/stage2.yaml reached both
        assert want["model"]["lr_scale"] == {"instance_encoder": 0, "layout": 0, "lora": 0}
    if stage > 1:
        assert want["model"]["loss"]["dino_identity_weight"] == 0.1


def test_an_arm_folder_with_checkpoints_of_an_earlier_run_is_refused(tmp_path):
    bench = load_bench("toy_stages")
    arm = tmp_path / "stage2"
    bench.check_fresh_arm(str(arm))  # absent: fine
    (arm / "runs/logs").mkdir(parents=True)
    bench.check_fresh_arm(str(arm))  # no checkpoint yet: fine
    (arm / "runs/checkpoints/stage2").mkdir(parents=True)
    (arm / "runs/checkpoints/stage2/step=0000100.ckpt").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"stage2 already holds 1 checkpoints of an earlier run.*--workdir"):
        bench.check_fresh_arm(str(arm))


def test_the_held_out_cast_is_unseen_and_named_by_shape_alone():
    bench = load_bench("toy_stages")
    cast = bench.unseen_cast(8, 1)
    training = bench.training_world()
    boxes = bench.TOY_WORLD["min_box"], bench.TOY_WORLD["max_box"]
    assert len(training.identities) == 120 and boxes == (48, 96)
    assert len(cast) == 8 and not set(cast) & {i.name for i in training.identities}
    seen = [x for i in range(40) for x in training.scene(i).instances if x.foreground]
    assert 0.3 < sum(x.caption == training.identity(x.identity).caption for x in seen) / len(seen) < 0.7
    held_out = ToyWorld(seed=1, cast=cast, describe_prob=0.0, min_box=boxes[0], max_box=boxes[1])
    for x in (x for i in range(10) for x in held_out.scene(i).instances if x.foreground):
        assert x.caption == f"a {held_out.identity(x.identity).shape}"
        assert min(x.bbox[2] - x.bbox[0], x.bbox[3] - x.bbox[1]) >= boxes[0]
