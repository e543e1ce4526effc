"""The CLI: configs/base.yaml under three short stage configs, run folders named by the stage."""

import json
import os
import re
from dataclasses import asdict
from pydoc import locate

import pytest
import yaml

import mpp.cli
from mpp.cli import CALLBACK_KEYS, MppCLI
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule
from tests.test_training import ROOT

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
    values.update({f"model.{k}": model.hparams[k] for k in ("stage", "backbone", "backbone_subfolder", "backbone_dtype",
                                                             "guidance", "lr", "weight_decay", "warmup_steps", "seed")})
    for key, obj in (("model.heads", model.heads), ("model.loss", model.loss_cfg), ("model.sampling", model.sampling),
                     ("data.encoders", data.encoders)):
        values.update(_flat(asdict(obj), key + "."))
    values.update({f"data.{k}": getattr(data, k) for k in ("root", "resolution", "batch_size", "val_fraction",
                                                            "num_workers", "pin_memory", "max_bad_records", "seed",
                                                            "predict_file")})
    values["data.toy"] = asdict(data.toy) if data.toy is not None else None
    trainer = cli.config.trainer.as_dict()
    values.update({k: v for k, v in _flat(trainer, "trainer.").items() if not k.startswith(("trainer.logger", "trainer.callbacks"))})
    values["trainer.logger"] = {"class_path": trainer["logger"]["class_path"],
                                "init_args": {k: trainer["logger"]["init_args"][k] for k in ("save_dir", "name", "version")}}
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
def test_each_stage_resolves_to_the_values_it_had_when_each_config_restated_everything(stage, toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # and from any working directory
    golden = json.load(open(os.path.join(ROOT, "tests/conf/stage_values.json")))
    expected = {**golden["stage1"], **golden[f"stage{stage}"], **(golden["toy"] if toy else {})}
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
    shared = set.intersection(*[{(k, json.dumps(v)) for k, v in _flat(yaml.safe_load(open(p))).items()} for p in STAGES])
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
    base = [c["class_path"].rsplit(".", 1)[1] for c in yaml.safe_load(open(mpp.cli.BASE_CONFIG))["trainer"]["callbacks"]]
    assert names[:len(base) + 2] == [*base, "Recorder", "SignalAt"]
    assert {"ModelCheckpoint", "ImageLogger", "Throughput"} <= set(names)
