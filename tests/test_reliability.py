"""Reliability under real schedulers (docs/reliability.md): non-finite training, bad data under DDP,
resumable scripts, disk use, preemption. Training runs through the real CLI on the toy world."""

import glob
import os
import re

import pytest
import torch

from mpp.checkpoints import AtomicCheckpointIO, NonFiniteError, is_loadable, latest_checkpoint, load_checkpoint
from mpp.cli import main
from tests.test_training import ROOT, fit_args, in_tmp, recorder  # noqa: F401  (in_tmp is a fixture)


def _ckpts(folder):
    return sorted(glob.glob(os.path.join(folder, "*.ckpt")))


def _all_finite(path):
    ckpt = load_checkpoint(path)
    return all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_diverging_run_stops_naming_step_rank_and_samples_and_saves_nothing_non_finite(in_tmp, toy_models, toy_prepared):
    with pytest.raises(NonFiniteError) as e:
        main(fit_args(1, toy_models, toy_prepared, "--model.lr=1e10", "--model.warmup_steps=0",
                      "--trainer.max_steps=8"))
    message = str(e.value)
    step = int(re.search(r"at optimizer step (\d+)", message).group(1))
    assert 1 < step <= 8 and "rank 0:" in message
    ids = re.search(r"samples \[([^\]]+)\]", message).group(1)
    assert ids.count("'") >= 2  # the batch's sample ids, quoted
    folder = in_tmp / "runs/checkpoints/stage1"
    saved = _ckpts(folder)
    assert [os.path.basename(p) for p in saved] == [f"step={s:07d}.ckpt" for s in range(1, step)]
    assert all(_all_finite(p) for p in saved)
    assert not (in_tmp / "runs/export").exists() and not (folder / "final.ckpt").exists()

    # discovery skips a non-finite checkpoint placed in the folder, even at a higher step
    newest = saved[-1]
    poisoned = load_checkpoint(newest)
    name = sorted(poisoned["state_dict"])[0]
    poisoned["state_dict"][name] = torch.full_like(poisoned["state_dict"][name], float("nan"))
    poisoned["global_step"] = 99
    torch.save(poisoned, folder / "step=0000099.ckpt")
    assert not is_loadable(str(folder / "step=0000099.ckpt"))
    assert latest_checkpoint(str(folder)) == newest
    # and the checkpoint writer refuses one, whoever calls it
    with pytest.raises(NonFiniteError, match=re.escape(name)):
        AtomicCheckpointIO().save_checkpoint(poisoned, folder / "step=0000100.ckpt")
    assert not (folder / "step=0000100.ckpt").exists()


def _trainable(path, keys):
    state = load_checkpoint(path)["state_dict"]
    return {k: state[k] for k in keys}


@pytest.mark.parametrize("budget", [0, 1])
def test_non_finite_gradients_stop_the_run_or_skip_within_the_budget(in_tmp, toy_models, toy_prepared, budget):
    """Micro-batch 3 (step 2 at accumulation 2) gets NaN gradients: without a budget the run stops
    before applying them; with model.max_skipped_steps=1 step 2 changes nothing and the run goes on."""
    args = fit_args(1, toy_models, toy_prepared, f"--model.max_skipped_steps={budget}", "--trainer.max_steps=4",
                    overlays=("tests/conf/fast.yaml", "tests/conf/poison.yaml"))
    folder = in_tmp / "runs/checkpoints/stage1"
    if budget == 0:
        with pytest.raises(NonFiniteError, match=r"at optimizer step 2 .*rank 0: gradient norm nan over samples \['"):
            main(args)
        assert [os.path.basename(p) for p in _ckpts(folder)] == ["step=0000001.ckpt"]
        return
    cli = main(args)
    assert cli.trainer.global_step == 4
    keys = sorted(cli.model.trainable_keys())
    one, two, three = (_trainable(folder / f"step={s:07d}.ckpt", keys) for s in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in keys)  # the skipped step applied nothing
    assert any(not torch.equal(two[k], three[k]) for k in keys)  # the next one trained
    assert load_checkpoint(folder / "final.ckpt")["callbacks"]["NonFiniteGuard"]["skipped"] == [2]
    assert all(_all_finite(p) for p in _ckpts(folder))


def _names(folder):
    return sorted(os.listdir(folder))


def test_restarts_leave_no_temporaries_and_at_most_the_configured_checkpoints(in_tmp, toy_models, toy_prepared):
    """A first run kept every checkpoint (another config); a write was killed, leaving its temporary.
    The restart keeping the last 2 removes the temporary and rotates out what the first run wrote."""
    folder = in_tmp / "runs/checkpoints/stage1"
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=3"))
    assert _names(folder) == ["final.ckpt", "step=0000001.ckpt", "step=0000002.ckpt", "step=0000003.ckpt"]
    (folder / ".tmp-k1ll3dstep=0000004.ckpt").write_bytes(b"half a checkpoint")
    os.unlink(folder / "final.ckpt")  # the first run was killed before its end
    keep = ("tests/conf/fast.yaml", "tests/conf/keep.yaml")
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=4", f"--ckpt_path={folder / 'step=0000003.ckpt'}",
                  overlays=keep))
    assert _names(folder) == ["final.ckpt", "step=0000003.ckpt", "step=0000004.ckpt"]
    # and again: a restart of the same config rotates out the checkpoint it resumed from
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=7", f"--ckpt_path={folder / 'step=0000004.ckpt'}",
                  overlays=keep))
    assert _names(folder) == ["final.ckpt", "step=0000006.ckpt", "step=0000007.ckpt"]

