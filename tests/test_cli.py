"""The CLI: configs/base.yaml under three short stage configs, run folders named by the stage, and a
first run that says what it is doing."""

import glob
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pydoc import locate

import pytest
import yaml

import mpp.cli
from mpp.cli import CALLBACK_KEYS, MppCLI, main
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule
from mpp.toy.bundle import toy_encoder_settings
from tests.helpers import ROOT, fit_args

STAGES = [os.path.join(ROOT, f"configs/stage{n}.yaml") for n in (1, 2, 3)]
TOY = os.path.join(ROOT, "configs/toy.yaml")


def cli_for(*configs, args=()) -> MppCLI:
    return MppCLI(MppModule, MppDataModule, run=False, args=[*[a for c in configs for a in ("--config", c)], *args])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "toy":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _callbacks(cli: MppCLI) -> list[tuple[type, dict]]:
    """Every callback the config asks for, listed or under its own key, with its init args."""
    listed = [(locate(c.class_path), c.init_args.as_dict() if c.get("init_args") else {})
              for c in cli.config.trainer.callbacks]
    return listed + [(cls, cli.config[key].as_dict()) for key, cls in CALLBACK_KEYS.items()]


def effective(cli: MppCLI) -> dict:
    """The resolved values, named as `--print_config` names them; model and data as the objects hold
    them (a group left to its class's defaults is null in the config)."""
    model, data = cli.model, cli.datamodule
    values = {"seed_everything": cli.config.seed_everything}
    hparams = ("stage", "backbone", "backbone_subfolder", "backbone_dtype", "guidance", "lr", "weight_decay",
               "warmup_steps", "lr_scale", "seed")
    values.update({f"model.{k}": model.hparams[k] for k in hparams})
    for key, obj in (("model.heads", model.heads), ("model.loss", model.loss_cfg), ("model.sampling", model.sampling),
                     ("data.encoders", data.encoders)):
        values.update(_flat(asdict(obj), key + "."))
    values.update({f"data.{k}": getattr(data, k) for k in ("root", "resolution", "batch_size", "val_fraction",
                                                            "num_workers", "pin_memory", "max_bad_records", "seed",
                                                            "predict_file")})
    values["data.toy"] = asdict(data.toy) if data.toy is not None else None
    trainer = cli.config.trainer.as_dict()
    values.update({k: v for k, v in _flat(trainer, "trainer.").items()
                   if not k.startswith(("trainer.logger", "trainer.callbacks"))})
    logger = trainer["logger"]
    values["trainer.logger"] = {"class_path": logger["class_path"],
                                "init_args": {k: logger["init_args"][k] for k in ("save_dir", "name", "version")}}
    values["trainer.callbacks"] = _callbacks(cli)
    return values


def _same_callbacks(expected: list[dict], got: list[tuple[type, dict]]) -> None:
    """Each expected callback has one configured counterpart of its class that sets what it set."""
    got = list(got)
    for want in expected:
        match = [g for g in got if g[0] is locate(want["class_path"])
                 and all(g[1].get(k) == v for k, v in want["init_args"].items())]
        assert match, want
        got.remove(match[0])
    assert not got, got


@pytest.mark.parametrize("toy", [False, True])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_resolves_to_its_values_from_when_each_config_restated_everything(stage, toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # and from any working directory
    golden = json.load(open(os.path.join(ROOT, "tests/conf/stage_values.json")))
    toy_parts = {**golden["toy"], **golden.get(f"toy_stage{stage}", {})} if toy else {}
    expected = {**golden["stage1"], **golden[f"stage{stage}"], **toy_parts}
    got = effective(cli_for(STAGES[stage - 1], *([TOY] if toy else [])))
    _same_callbacks(expected.pop("trainer.callbacks"), got.pop("trainer.callbacks"))
    assert {k: got.get(k, "<missing>") for k in expected} == expected


def _keys(path: str) -> set[str]:
    return set(_flat(yaml.safe_load(open(path)) or {}))


def test_stage_configs_hold_only_what_their_stage_changes():
    base = _keys(mpp.cli.BASE_CONFIG)
    for path in STAGES:
        lines = [x for x in open(path).read().splitlines() if x.strip() and not x.lstrip().startswith("#")]
        assert len(lines) <= 40, path
        assert not _keys(path) & base, path
    # what the stages share is stated once
    stated = [{(k, json.dumps(v)) for k, v in _flat(yaml.safe_load(open(p))).items()} for p in STAGES]
    shared = set.intersection(*stated)
    assert not shared, shared


def test_one_edit_of_the_base_changes_every_stage(tmp_path, monkeypatch):
    edited = tmp_path / "base.yaml"
    edited.write_text(open(mpp.cli.BASE_CONFIG).read().replace("warmup_steps: 100", "warmup_steps: 7"))
    monkeypatch.setattr(mpp.cli, "BASE_CONFIG", str(edited))
    monkeypatch.chdir(tmp_path)
    assert [cli_for(path).model.hparams.warmup_steps for path in STAGES] == [7, 7, 7]


def test_run_folders_follow_the_stage_unless_set(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mpp.callbacks import ExportSafetensors, LayoutWriter, PreemptionCheckpoint

    monkeypatch.chdir(tmp_path)
    cli = cli_for(STAGES[1], args=["--checkpoint.dirpath=elsewhere"])
    folders = {(type(c).__name__, c.dirpath) for c in cli.trainer.callbacks
               if isinstance(c, (ModelCheckpoint, PreemptionCheckpoint, ExportSafetensors, LayoutWriter))}
    assert folders == {("ModelCheckpoint", str(tmp_path / "elsewhere")),
                       ("ModelCheckpoint", str(tmp_path / "runs/checkpoints/stage2")),
                       ("PreemptionCheckpoint", "runs/checkpoints/stage2"),
                       ("ExportSafetensors", "runs/export/stage2"), ("LayoutWriter", "runs/generated/stage2")}


def test_test_overlays_append_to_the_callbacks():
    cli = cli_for(STAGES[0], TOY, *[os.path.join(ROOT, f"tests/conf/{c}.yaml") for c in ("fast", "preempt")])
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    listed = yaml.safe_load(open(mpp.cli.BASE_CONFIG))["trainer"]["callbacks"]
    base = [c["class_path"].rsplit(".", 1)[1] for c in listed]
    assert names[:len(base) + 2] == [*base, "Recorder", "SignalAt"]
    assert {"ModelCheckpoint", "ImageLogger", "Throughput"} <= set(names)


def test_a_fit_that_fails_before_training_leaves_no_log_folder(tmp_path, monkeypatch, toy_models, toy_prepared):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="manifest.jsonl does not exist"):
        main(fit_args(1, toy_models, toy_prepared, f"--data.root={tmp_path / 'nowhere'}"))
    assert glob.glob("runs/logs/*") == []


def test_first_run_shows_its_progress_from_any_directory(tmp_path):
    """`mpp fit` on a fresh toy world from another folder: the toy build and the run say what they do
    on stderr (each line once, without Lightning's warning about `args`), and the training bar counts
    optimizer steps."""
    enc = toy_encoder_settings(str(tmp_path / "models"))
    args = ["fit", *[a for c in (STAGES[0], TOY, os.path.join(ROOT, "tests/conf/fast.yaml")) for a in ("--config", c)],
            f"--data.root={tmp_path / 'data'}", f"--model.backbone={tmp_path / 'models'}",
            f"--data.encoders.flux={enc.flux}", f"--data.encoders.clip_vision={enc.clip_vision}",
            f"--data.encoders.dino={enc.dino}", f"--data.toy.models_dir={tmp_path / 'models'}",
            "--data.toy.pretrain_steps=0", "--data.toy.vision_steps=0", "--data.toy.num_samples=12",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=true", "--images.every_n_steps=1000"]
    run = subprocess.run([sys.executable, "-m", "mpp", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-3000:]
    err = run.stderr.splitlines()
    said = [re.match(r"INFO (mpp\.[\w.]+): (.*)", x).groups() for x in err if x.startswith("INFO mpp.")]
    expected = [("mpp.cli", "stage 1: logs in "), ("mpp.toy.models", "building the toy models in "),
                ("mpp.toy.models", "toy models ready in "),
                ("mpp.prepare", "shard 0/1: 12 samples prepared (12 written now, 0 already done)"),
                ("mpp.callbacks.export", "exporting the stage-1 weights"),
                ("mpp.callbacks.export", "exported config.json, heads.safetensors, lora_layout_branch.safetensors"),
                ("mpp.callbacks.final", "stage finished at step 2: ")]
    assert len(said) == len(expected), said
    assert all(n == want_n and m.startswith(want_m)
               for (n, m), (want_n, want_m) in zip(said, expected, strict=True)), said
    assert sum("Seed set to 0" in x for x in err) == 1
    assert "args parameter" not in run.stderr and "in eval mode" not in run.stderr
    bar = run.stdout.replace("\r", "\n")
    assert re.search(r"stage 1: 100%\S* *\S* 2/2 ", bar) and "Epoch" not in bar


def test_lightning_lines_print_once_after_a_tool_configured_logging():
    """`mpp generate` and `mpp prepare` configure logging before Lightning is imported; its lines then
    reached both Lightning's handler and the root one."""
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from mpp.cli import configure_logging; configure_logging(); "
            "from lightning.fabric.utilities.seed import seed_everything; seed_everything(0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("Seed set to 0") == 1, run.stderr


def test_fit_help_names_the_keyed_callbacks_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--checkpoint.every_n_train_steps", "--best_checkpoint.save_top_k", "--images.every_n_steps",
                   "--throughput.window"):
        assert option in out, option


def test_validate_logs_to_a_folder_named_by_its_stage(tmp_path, monkeypatch, toy_models, toy_prepared):
    monkeypatch.chdir(tmp_path)
    args = fit_args(2, toy_models, toy_prepared, "--trainer.max_steps=1")
    main(args)
    main(["validate", *args[1:], "--ckpt_path=runs/checkpoints/stage2/step=0000001.ckpt"])
    assert sorted(re.sub(r"\d{8}-\d{6}", "T", os.path.basename(p)) for p in glob.glob("runs/logs/*")) == [
        "stage2_T", "stage2_validate_T"]


def test_an_overlay_adds_its_stage_part_after_itself(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra.yaml").write_text("model: {lr: 0.5}\n")
    (tmp_path / "extra/stage2.yaml").write_text("model: {warmup_steps: 3}\n")
    overlay, part = str(tmp_path / "extra.yaml"), str(tmp_path / "extra/stage2.yaml")
    args = ["fit", "--config", "a.yaml", "--config", overlay, "--model.lr=1"]
    assert mpp.cli.with_stage_overlays(args, 2) == ["fit", "--config", "a.yaml", "--config", overlay,
                                                    "--config", part, "--model.lr=1"]
    assert mpp.cli.with_stage_overlays([f"--config={overlay}"], 2) == [f"--config={overlay}", "--config", part]
    assert mpp.cli.with_stage_overlays(args, 1) == args  # no extra/stage1.yaml
    named = ["--config", overlay, "--config", part]
    assert mpp.cli.with_stage_overlays(named, 2) == named
    # resolved: the stage part under its stage only, and a later flag still wins over it
    assert cli_for(STAGES[1], overlay, args=["--model.warmup_steps=9"]).model.hparams.warmup_steps == 9
    assert cli_for(STAGES[1], overlay).model.hparams.warmup_steps == 3
    assert cli_for(STAGES[0], overlay).model.hparams.warmup_steps == 100
    assert cli_for(STAGES[0], overlay).model.hparams.lr == 0.5


def test_an_overlay_stage_part_may_not_change_the_stage(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra.yaml").write_text("model: {lr: 0.5}\n")
    (tmp_path / "extra/stage2.yaml").write_text("model: {stage: 3}\n")
    with pytest.raises(ValueError, match=r"stage-2 part sets model.stage=3"):
        cli_for(STAGES[1], str(tmp_path / "extra.yaml"))


def test_print_config_shows_the_stage_part_of_the_toy_overlay(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", STAGES[1], "--config", TOY, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["lr_scale"] == {"instance_encoder": 0, "layout": 0, "lora": 0}
    assert printed["model"]["lr"] == 1e-3
