"""The EMA of what trains: exact resume, its size in the checkpoint, and the weights it hands the export."""

import os

import pytest
import torch
from safetensors.torch import load_file

from mpp.__main__ import main as mpp_main
from mpp.callbacks import EMA
from mpp.cli import main
from tests.helpers import export_command, fit_args

EMA_ON = ["--ema.enabled=true", "--ema.decay=0.5", "--ema.start_step=1"]


def _ema(cli) -> EMA:
    return next(c for c in cli.trainer.callbacks if isinstance(c, EMA))


def _ema_state(ckpt) -> dict:
    callbacks = torch.load(ckpt, weights_only=False, map_location="cpu")["callbacks"]
    return next(v for k, v in callbacks.items() if k.startswith("EMA"))


def test_ema_resumes_exactly_and_is_not_the_weights(tmp_path, monkeypatch, toy_models, toy_prepared):
    (tmp_path / "full").mkdir(), (tmp_path / "half").mkdir()
    monkeypatch.chdir(tmp_path / "full")
    full = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=4", *EMA_ON))
    monkeypatch.chdir(tmp_path / "half")
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", *EMA_ON))
    ckpt = tmp_path / "half/runs/checkpoints/stage1/step=0000002.ckpt"
    resumed = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=4", f"--ckpt_path={ckpt}", *EMA_ON))
    a, b = _ema(full).shadow, _ema(resumed).shadow
    assert a.keys() == b.keys() == full.model.trainable_keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = _ema_state(tmp_path / "full/runs/checkpoints/stage1/step=0000004.ckpt")["shadow"]
    assert all(torch.equal(saved[k], a[k]) for k in a)
    # decay 0.5 from step 1: the average lags the weights it follows
    weights = full.model.state_dict()
    assert any(not torch.equal(a[k], weights[k].float()) for k in a)


def test_ema_checkpoint_stays_within_twice_the_trainable_weights_plus_the_optimizer(in_tmp, toy_models,
                                                                                   toy_prepared):
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", *EMA_ON))
    ckpt = in_tmp / "runs/checkpoints/stage1/step=0000002.ckpt"
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    trainable = sum(p.numel() * p.element_size() for p in cli.model.parameters() if p.requires_grad)
    ema = sum(t.numel() * t.element_size() for t in _ema_state(ckpt)["shadow"].values())
    assert ema == trainable  # float32 weights: one copy, nothing of the frozen backbone
    optimizer = sum(t.numel() * t.element_size() for o in state["optimizer_states"] for s in o["state"].values()
                    for t in s.values() if isinstance(t, torch.Tensor))
    assert os.path.getsize(ckpt) <= 2 * trainable + optimizer + 2_000_000  # + pickled config, names, RNG


def test_ema_is_what_the_export_holds_and_training_keeps_its_own_weights(in_tmp, toy_models, toy_prepared):
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", *EMA_ON))
    shadow = _ema(cli).shadow
    heads = load_file(in_tmp / "runs/export/stage1/heads.safetensors")
    live = cli.model.state_dict()
    compared = [k for k in shadow if k.removeprefix("model.") in heads]
    assert compared
    for k in compared:
        torch.testing.assert_close(heads[k.removeprefix("model.")], shadow[k].to(heads[k.removeprefix("model.")].dtype),
                                   rtol=0, atol=0)
    assert any(not torch.equal(live[k], shadow[k]) for k in compared)  # the module got its own weights back


def test_ema_settings_are_checked():
    with pytest.raises(ValueError, match="--ema.decay"):
        EMA(enabled=True, decay=1.0)


def test_ema_export_of_a_checkpoint_holds_its_average(in_tmp, toy_models, toy_prepared):
    args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=3", *EMA_ON)
    main(args)
    ckpt = str(in_tmp / "runs/checkpoints/stage1/step=0000002.ckpt")
    command = [*export_command(args), "--ckpt_path", ckpt]
    assert mpp_main([*command, "--out", str(in_tmp / "ema"), "--ema"]) == 0
    assert mpp_main([*command, "--out", str(in_tmp / "plain")]) == 0
    shadow, weights = _ema_state(ckpt)["shadow"], torch.load(ckpt, weights_only=False)["state_dict"]
    ema, plain = load_file(in_tmp / "ema/heads.safetensors"), load_file(in_tmp / "plain/heads.safetensors")
    compared = [k.removeprefix("model.") for k in shadow if k.removeprefix("model.") in ema]
    assert compared and all(torch.equal(ema[k], shadow[f"model.{k}"]) for k in compared)
    assert all(torch.equal(plain[k], weights[f"model.{k}"]) for k in compared)
    assert any(not torch.equal(ema[k], plain[k]) for k in compared)


def test_ema_export_of_a_run_without_one_names_the_flag(in_tmp, toy_models, toy_prepared):
    args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1")
    main(args)
    with pytest.raises(ValueError, match="holds no EMA"):
        mpp_main([*export_command(args), "--ckpt_path", str(in_tmp / "runs/checkpoints/stage1/step=0000001.ckpt"),
                  "--out", str(in_tmp / "e"), "--ema"])
