"""Training through the real CLI on the toy world: logging, checkpoints, exact resume, stages."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mpp.callbacks import ExportSafetensors
from mpp.callbacks.preemption import PREEMPTED_EXIT, exit_code
from mpp.cli import BASE_CONFIG, MppCLI, main
from mpp.data.layout import read_manifest
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule
from mpp.nn.model import STAGE_GROUPS
from tests.helpers import ROOT, fit_args, recorder


def scalars(log_dir) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _strategy_from(path):
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    cfg = parser.parse_object({"strategy": yaml.safe_load(open(path))["trainer"]["strategy"]})
    return parser.instantiate_classes(cfg).strategy


def test_every_config_parses_and_instantiates(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    monkeypatch.chdir(tmp_path)
    shipped = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    assert len(shipped) == 7 and BASE_CONFIG in shipped
    for path in shipped:
        part = re.fullmatch(r"(.*)/(stage\d)\.yaml", os.path.relpath(path, os.path.join(ROOT, "configs")))
        if part:  # an overlay's stage part (configs/toy/stage2.yaml): read after its overlay under that stage
            overlay = os.path.join(ROOT, "configs", f"{part.group(1)}.yaml")
            cli = MppCLI(MppModule, MppDataModule, run=False,
                         args=["--config", os.path.join(ROOT, f"configs/{part.group(2)}.yaml"), "--config", overlay])
            assert cli.model.stage == int(part.group(2)[-1])
            assert cli.model.lr_scale == {"instance_encoder": 0, "layout": 0, "lora": 0}
            continue
        if path.endswith("fsdp.yaml"):  # Lightning's Trainer refuses FSDP without a GPU: build the strategy alone
            strategy = _strategy_from(path)
            assert isinstance(strategy, FSDPStrategy)
            assert {c.__name__ for c in strategy.kwargs["auto_wrap_policy"]._module_classes} == {
                "FluxTransformerBlock", "FluxSingleTransformerBlock"}
            continue
        if path == BASE_CONFIG:  # read under every run, alone too
            configs = []
        elif os.path.basename(path).startswith("stage"):
            configs = [path]
        else:
            configs = [os.path.join(ROOT, "configs/stage1.yaml"), path]
        cli = MppCLI(MppModule, MppDataModule, run=False, args=[a for c in configs for a in ("--config", c)])
        assert isinstance(cli.model, MppModule) and isinstance(cli.datamodule, MppDataModule)
        exports = [c for c in cli.trainer.callbacks if isinstance(c, ExportSafetensors)]
        assert [c.dirpath for c in exports] == [f"runs/export/stage{cli.model.stage}"]
        if path.endswith("toy.yaml"):
            assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
            continue
        assert isinstance(cli.trainer.strategy, DDPStrategy)
        assert cli.datamodule.batch_size == 2 and cli.trainer.accumulate_grad_batches == 4
        if path != BASE_CONFIG:
            stage = int(re.search(r"stage(\d)", path).group(1))
            assert cli.model.stage == stage
            assert cli.trainer.max_steps == {1: 70_000, 2: 150_000, 3: 10_000}[stage]
            assert cli.model.hparams.lr == {1: 1e-4, 2: 5e-6, 3: 1e-5}[stage]
            assert cli.model.loss_cfg.dino_identity_weight == {1: 0, 2: 0.1, 3: 0.1}[stage]


def test_fit_logs_scalars_and_images_and_checkpoints_only_mpp_weights(in_tmp, toy_models, toy_prepared):
    cli = main(fit_args(1, toy_models, toy_prepared))
    (log_dir,) = glob.glob(str(in_tmp / "runs/logs/*"))
    assert re.fullmatch(r"stage1_\d{8}-\d{6}", os.path.basename(log_dir))
    acc = scalars(log_dir)
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/flow_matching", "loss/reconstruction", "loss/total", "loss/alpha_bce", "metrics/alpha_mean",
                "metrics/alpha_fg_ratio", "metrics/alpha_auc", "metrics/feedback_magnitude", "train/grad_norm",
                "train/samples_per_s", "val/loss", "val/loss/alpha_bce", "val/metrics/alpha_auc"):
        assert tag in tags, tag
    assert any(t.startswith("lr-") for t in tags)
    images = acc.Images("images/truth_vs_generated")
    assert [e.step for e in images] == [0, 2, 4]

    ckpt = torch.load(in_tmp / "runs/checkpoints/stage1/step=0000004.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys == cli.model.owned_keys()
    assert not [k for k in keys if k.startswith("model.backbone.") and ".lora_" not in k]
    trainable = cli.model.trainable_keys()
    assert trainable and trainable <= keys
    assert ckpt["mpp"]["stage"] == 1 and ckpt["mpp"]["log_version"] == os.path.basename(log_dir)


def test_missing_trainable_weight_is_reported(in_tmp, toy_models, toy_prepared):
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1"))
    path = in_tmp / "runs/checkpoints/stage1/step=0000001.ckpt"
    ckpt = torch.load(path, weights_only=False)
    dropped = sorted(ckpt["state_dict"])[0]
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(dropped)):
        main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", f"--ckpt_path={path}"))


@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch, and the end of epoch 0 (9 batches, accumulation 2)
def test_exact_resume(tmp_path, monkeypatch, toy_models, toy_prepared, stop_at):
    (tmp_path / "full").mkdir(), (tmp_path / "half").mkdir()
    monkeypatch.chdir(tmp_path / "full")
    full = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=8"))
    monkeypatch.chdir(tmp_path / "half")
    first = main(fit_args(1, toy_models, toy_prepared, f"--trainer.max_steps={stop_at}"))
    ckpt = tmp_path / f"half/runs/checkpoints/stage1/step={stop_at:07d}.ckpt"
    resumed = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=8", f"--ckpt_path={ckpt}"))

    assert len(recorder(full).losses) > 9  # across the epoch boundary
    assert recorder(first).ids + recorder(resumed).ids == recorder(full).ids
    assert recorder(first).losses + recorder(resumed).losses == recorder(full).losses
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in full.model.trainable_keys():
        assert torch.equal(a[k], b[k]), k
    # the resumed run continued the same TensorBoard folder
    assert len(glob.glob(str(tmp_path / "half/runs/logs/*"))) == 1


def test_exact_resume_with_buckets(tmp_path, monkeypatch, toy_models, toy_wide_prepared):
    """Mid-epoch, on the widescreen toy data: batches of 176×96 and 192×80 frames beside squares, the
    image grid of mixed sizes every 2 steps; the resumed run trains the same batches to the same losses."""
    (tmp_path / "full").mkdir(), (tmp_path / "half").mkdir()
    monkeypatch.chdir(tmp_path / "full")
    full = main(fit_args(1, toy_models, toy_wide_prepared, "--trainer.max_steps=6"))
    monkeypatch.chdir(tmp_path / "half")
    first = main(fit_args(1, toy_models, toy_wide_prepared, "--trainer.max_steps=3"))
    ckpt = tmp_path / "half/runs/checkpoints/stage1/step=0000003.ckpt"
    resumed = main(fit_args(1, toy_models, toy_wide_prepared, "--trainer.max_steps=6", f"--ckpt_path={ckpt}"))
    ids, losses = recorder(full).ids, recorder(full).losses
    assert recorder(first).ids + recorder(resumed).ids == ids and len(recorder(first).ids) == 12  # stopped mid-epoch
    assert recorder(first).losses + recorder(resumed).losses == losses
    bucket = {r["id"]: tuple(r["bucket"]) for r in read_manifest(os.path.join(toy_wide_prepared, "manifest.jsonl"))}
    batches = [{bucket[i] for i in ids[k : k + 2]} for k in range(0, len(ids), 2)]
    assert all(len(b) == 1 for b in batches) and len(set().union(*batches)) > 1  # one bucket a batch, several buckets


def test_stages_chain_with_their_own_modules_lr_and_step_count(tmp_path, monkeypatch, toy_models, toy_prepared, caplog):
    prev_ckpt, prev_state = None, None
    for stage in (1, 2, 3):
        (tmp_path / f"s{stage}").mkdir()
        monkeypatch.chdir(tmp_path / f"s{stage}")
        extra = [f"--ckpt_path={prev_ckpt}"] if prev_ckpt else []
        caplog.clear()
        # the identity term draws its own low t: stages 2-3 compute it at every step. Each stage's own lr
        # (the toy overlay's 1e-3 replaced here), never the previous checkpoint's
        lr = {1: 1e-4, 2: 5e-6, 3: 1e-5}[stage]
        cli = main(fit_args(stage, toy_models, toy_prepared, "--trainer.max_steps=2", f"--model.lr={lr}", *extra))
        carried = [r.getMessage() for r in caplog.records if r.name.startswith("mpp.") and r.levelno == logging.INFO]
        assert any(f"stage {stage} starts from the weights of stage-{stage - 1}" in m for m in carried) == (stage > 1)
        model = cli.model
        groups = model.model.parameter_groups()
        # the stage's groups, less those the toy recipe freezes (configs/toy/stage2.yaml: the head alone)
        trains = [g for g in STAGE_GROUPS[stage] if model.lr_scale.get(g, 1.0) > 0]
        assert trains == {1: ["alpha", "instance_encoder", "layout", "lora"], 2: ["modulation"], 3: ["feedback"]}[stage]
        assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for g in trains for p in groups[g]}
        assert cli.trainer.global_step == 2  # started at step 0
        assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == lr
        assert model.hparams.lr == lr
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if prev_state is not None:
            # weights the previous stage trained and this one freezes were carried over unchanged
            frozen_now = set(prev_state) & (model.owned_keys() - model.trainable_keys())
            assert frozen_now
            for k in frozen_now:
                assert torch.equal(state[k], prev_state[k]), k
        (log_dir,) = glob.glob("runs/logs/*")
        tags = set(scalars(log_dir).Tags()["scalars"])
        assert ("loss/dino_identity" in tags) == (stage >= 2)
        if stage >= 2:
            identity = {"metrics/dino_similarity_mean", "val/loss/dino_identity", "val/metrics/dino_similarity_mean"}
            assert identity <= tags
            acc = scalars(log_dir)
            steps = [e.step for e in acc.Scalars("loss/flow_matching")]
            assert [e.step for e in acc.Scalars("loss/dino_identity")] == steps  # no step without identity signal
        prev_ckpt = str(tmp_path / f"s{stage}/runs/checkpoints/stage{stage}/step=0000002.ckpt")
        prev_state = {k: v for k, v in state.items() if k in torch.load(prev_ckpt, weights_only=False)["state_dict"]}


def test_checkpoint_of_a_non_adjacent_stage_is_refused(in_tmp, toy_models, toy_prepared):
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1"))
    ckpt = in_tmp / "runs/checkpoints/stage1/step=0000001.ckpt"
    with pytest.raises(ValueError, match="stage-1 checkpoint; stage 3 resumes from stage 3 or starts from stage 2"):
        main(fit_args(3, toy_models, toy_prepared, f"--ckpt_path={ckpt}"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_saves_a_checkpoint_and_stops(in_tmp, toy_models, toy_prepared, signum):
    args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=50", f"--trainer.callbacks.signum={int(signum)}",
                    overlays=("tests/conf/fast.yaml", "tests/conf/preempt.yaml"))
    # the signal comes as batch 5 starts, mid-accumulation (2 batches a step): the run finishes step 3
    cli = main(args)
    assert cli.trainer.global_step == 3 and exit_code(cli.trainer) == PREEMPTED_EXIT == 75
    ckpt = torch.load(in_tmp / "runs/checkpoints/stage1/preempted.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["mpp"]["micro_step"] == 6
    assert not (in_tmp / "runs/checkpoints/stage1/final.ckpt").exists()  # a partial stage is not final
    # no validation after the notice (Lightning validates a run that stops early): nothing ranked at step 3
    assert not list((in_tmp / "runs/checkpoints/stage1").glob("best-step=0000003*"))
    # resumed to the stage's end, which leaves no stale preempted.ckpt beside final.ckpt
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=4",
                  f"--ckpt_path={in_tmp / 'runs/checkpoints/stage1/preempted.ckpt'}"))
    assert (in_tmp / "runs/checkpoints/stage1/final.ckpt").exists()
    assert not (in_tmp / "runs/checkpoints/stage1/preempted.ckpt").exists()


def _two_ranks(in_tmp, toy_models, data) -> tuple[dict, dict]:
    """Two DDP processes train 2 steps on `data`; what each rank's Recorder saw."""
    out = in_tmp / "ranks"
    args = fit_args(1, toy_models, data, "--trainer.strategy=ddp", "--trainer.devices=2",
                    "--trainer.max_steps=2", overlays=("tests/conf/fast.yaml", "tests/conf/ranks.yaml"))
    env = {**os.environ, "MPP_RECORD_DIR": str(out), "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], check=True, env=env, timeout=600)
    return tuple(json.load(open(out / f"rank{r}.json")) for r in (0, 1))


@pytest.mark.slow
def test_ddp_two_processes_see_different_samples(in_tmp, toy_models, toy_prepared):
    r0, r1 = _two_ranks(in_tmp, toy_models, toy_prepared)
    # one epoch: 19 training samples → 9 per rank → 4 batches of 2 → 2 steps at accumulation 2
    assert len(r0["ids"]) == len(r1["ids"]) == 8
    assert not set(r0["ids"]) & set(r1["ids"])
    assert all(len(r["losses"]) == 4 for r in (r0, r1))


@pytest.mark.slow
def test_ddp_two_processes_share_each_step_within_one_bucket(in_tmp, toy_models, toy_wide_prepared):
    r0, r1 = _two_ranks(in_tmp, toy_models, toy_wide_prepared)
    bucket = {r["id"]: tuple(r["bucket"]) for r in read_manifest(os.path.join(toy_wide_prepared, "manifest.jsonl"))}
    assert len(r0["ids"]) == len(r1["ids"]) == 8 and not set(r0["ids"]) & set(r1["ids"])
    for k in range(0, 8, 2):  # batch by batch, both ranks in one bucket
        assert len({bucket[i] for i in r0["ids"][k : k + 2] + r1["ids"][k : k + 2]}) == 1
    assert len({bucket[i] for i in r0["ids"]}) > 1


def test_lr_scale_sets_each_groups_rate_and_zero_freezes(in_tmp, toy_models, toy_prepared):
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1", "--model.lr=1e-3",
                        "--model.lr_scale={layout: 0.1, lora: 0}"))
    opt = cli.trainer.optimizers[0]
    assert {g["name"]: g["initial_lr"] for g in opt.param_groups} == {
        "alpha": 1e-3, "instance_encoder": 1e-3, "layout": pytest.approx(1e-4)}
    groups = cli.model.model.parameter_groups()
    assert not any(p.requires_grad for p in groups["lora"])
    assert all(p.requires_grad for p in groups["layout"])
    # a frozen group is still saved: the next stage loads it
    state = torch.load(in_tmp / "runs/checkpoints/stage1/step=0000001.ckpt", weights_only=False)["state_dict"]
    assert any("lora" in k for k in state)


@pytest.mark.parametrize("scale, message", [
    ({"modulation": 0.5}, "does not train"),
    ({"layout": -1.0}, ">= 0"),
    ({"alpha": 0, "instance_encoder": 0, "layout": 0, "lora": 0}, "every group"),
])
def test_lr_scale_errors_name_the_flag(scale, message):
    with pytest.raises(ValueError, match=f"model.lr_scale.*{message}|{message}.*"):
        MppModule(stage=1, lr_scale=scale)


def test_a_head_no_stage_trained_yet_may_change_shape_between_stages(tmp_path, monkeypatch, toy_models,
                                                                      toy_prepared):
    """Stage 2 starts from stage 1's weights with a gridded modulation head (stage 1 never trained it, so its
    fresh initialisation stands); a trained head of another shape is refused, naming the setting."""
    monkeypatch.chdir(tmp_path)
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1"))
    ckpt = str(tmp_path / "runs/checkpoints/stage1/step=0000001.ckpt")
    cli = main(fit_args(2, toy_models, toy_prepared, "--trainer.max_steps=1", f"--ckpt_path={ckpt}",
                        "--model.heads.modulation_grid=2"))
    assert cli.model.model.modulation.down[0].weight.shape[0] == 4 * cli.model.heads.modulation_rank
    stage1 = torch.load(ckpt, weights_only=False)["state_dict"]
    key = next(k for k in stage1 if ".alpha_predictor." in k)
    assert torch.equal(cli.model.state_dict()[key], stage1[key])
    with pytest.raises(ValueError, match=r"other --model.heads settings; .*lora"):
        main(fit_args(2, toy_models, toy_prepared, "--trainer.max_steps=1", f"--ckpt_path={ckpt}",
                      "--model.heads.lora_rank=3"))
