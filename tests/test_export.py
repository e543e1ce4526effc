"""The export: diffusers loads its LoRA, and `load_exported` rebuilds the trained model without Lightning."""

import json
import logging
import os

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from mpp.cli import main
from mpp.export import load_exported
from mpp.toy.bundle import toy_encoder_settings
from tests.helpers import fit_args, toy_conditioning


def _relative_paths(toy_models, cwd) -> list[str]:
    enc = toy_encoder_settings(toy_models)
    rel = {k: os.path.relpath(v, cwd) for k, v in (("backbone", toy_models), ("flux", enc.flux),
                                                     ("clip_vision", enc.clip_vision), ("dino", enc.dino))}
    return [f"--model.backbone={rel['backbone']}", f"--data.encoders.flux={rel['flux']}",
            f"--data.encoders.clip_vision={rel['clip_vision']}", f"--data.encoders.dino={rel['dino']}"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(latents=torch.randn(2, 16, 16, 16, generator=g), timesteps=torch.rand(2, generator=g),
                **toy_conditioning(2, 3, g))


def test_a_layout_scope_export_is_not_a_plain_lora_and_rebuilds_from_any_directory(in_tmp, toy_models, toy_prepared,
                                                                                  caplog, monkeypatch):
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", *_relative_paths(toy_models, in_tmp)))
    export = in_tmp / "runs/export/stage1"
    said = [r.getMessage() for r in caplog.records if r.name == "mpp.callbacks.export" and r.levelno == logging.INFO]
    assert said == ["exporting the stage-1 weights to runs/export/stage1",
                    "exported config.json, heads.safetensors, lora_layout_branch.safetensors to runs/export/stage1"]
    config = json.loads((export / "config.json").read_text())
    assert config["heads"]["lora_scope"] == "layout"
    for path in (config["backbone"], *(config["encoders"][k] for k in ("flux", "clip_vision", "dino"))):
        assert os.path.isabs(path) and os.path.isdir(path)
    heads = load_file(export / "heads.safetensors")
    assert heads and all(not k.startswith("backbone.") for k in heads)

    # the Python API rebuilds the same model from the export alone, without Lightning, from elsewhere
    monkeypatch.chdir(in_tmp.parent)
    model, loaded = load_exported(str(export))
    trained = cli.model.model.eval()
    assert loaded.guidance == cli.model.hparams.guidance and loaded.encoders.crop_margin == 0.1
    assert loaded.sampling == cli.model.sampling and loaded.heads == cli.model.heads
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).velocity, trained(**_inputs()).velocity, rtol=0, atol=0)


def test_an_all_scope_export_loads_into_diffusers_with_its_alpha(in_tmp, toy_models, toy_prepared):
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", "--model.heads.lora_scope=all",
                        "--model.heads.lora_alpha=16"))
    export = in_tmp / "runs/export/stage1"
    assert not (export / "lora_layout_branch.safetensors").exists()
    fresh = FluxTransformer2DModel.from_pretrained(toy_models, subfolder="transformer")
    fresh.load_lora_adapter(str(export), weight_name="lora.safetensors", prefix="transformer", adapter_name="mpp")
    ours = cli.model.model.lora_state_dict()
    loaded = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert len(loaded) == len(ours) > 0
    for name, value in ours.items():
        match = [p for n, p in loaded.items() if n.replace(".mpp", "") == name]
        assert len(match) == 1 and torch.equal(match[0], value), name
    # rank 4 at alpha 16: diffusers builds the adapter with the trained scale, not alpha = rank's 1
    scales = {m.scaling["mpp"] for m in fresh.modules() if hasattr(m, "scaling") and "mpp" in m.scaling}
    assert scales == {4.0}
    model, _ = load_exported(str(export))
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).velocity, cli.model.model.eval()(**_inputs()).velocity,
                                   rtol=0, atol=0)
