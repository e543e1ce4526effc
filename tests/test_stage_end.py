"""A run killed between its last periodic checkpoint and final.ckpt: the rerun finishes the stage."""

import os
import shutil

import torch
from safetensors.torch import load_file

from mpp.checkpoints import plan
from mpp.cli import main
from tests.helpers import fit_args


def _files(folder):
    return {name: load_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith(".safetensors")}


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_the_rerun(in_tmp, toy_models, toy_prepared, caplog):
    args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", "--ema.enabled=true", "--ema.decay=0.5")
    main(args)
    folder, export = in_tmp / "runs/checkpoints/stage1", in_tmp / "runs/export/stage1"
    exported = _files(export)
    weights = torch.load(folder / "final.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    # what a SIGKILL right after step=0000002.ckpt leaves (checkpoint writes are atomic): no final, no export
    os.unlink(folder / "final.ckpt")
    shutil.rmtree(export)
    action, last = plan(1, "runs/checkpoints")
    assert (action, os.path.basename(last)) == ("resume", "step=0000002.ckpt")

    main([*args, "--ckpt_path", last])
    assert plan(1, "runs/checkpoints") == ("done", "runs/checkpoints/stage1/final.ckpt")
    assert plan(2, "runs/checkpoints") == ("start", "runs/checkpoints/stage1/final.ckpt")  # train.sh goes on
    again = torch.load(folder / "final.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    rewritten = _files(export)
    assert rewritten.keys() == exported.keys()  # the EMA's weights, as the end of training exported them
    for name, tensors in exported.items():
        assert all(torch.equal(rewritten[name][k], v) for k, v in tensors.items()), name
    assert "is at step 2, this stage's max_steps=2: finishing the stage from it" in caplog.text
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp-")]
