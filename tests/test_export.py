"""The export: diffusers loads its LoRA, and `load_exported` rebuilds the trained model without Lightning."""

import logging

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from mpp.cli import main
from mpp.export import load_exported
from tests.helpers import fit_args, toy_conditioning


def test_export_loads_with_diffusers(in_tmp, toy_models, toy_prepared, caplog):
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2"))
    export = in_tmp / "runs/export/stage1"
    said = [r.getMessage() for r in caplog.records if r.name == "mpp.callbacks.export" and r.levelno == logging.INFO]
    assert said == ["exporting the stage-1 weights to runs/export/stage1",
                    "exported config.json, heads.safetensors, lora.safetensors to runs/export/stage1"]
    fresh = FluxTransformer2DModel.from_pretrained(toy_models, subfolder="transformer")
    fresh.load_lora_adapter(str(export / "lora.safetensors"), prefix="transformer", adapter_name="mpp")
    ours = cli.model.model.lora_state_dict()
    loaded = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert len(loaded) == len(ours) > 0
    for name, value in ours.items():
        match = [p for n, p in loaded.items() if n.replace(".mpp", "") == name]
        assert len(match) == 1 and torch.equal(match[0], value), name
    heads = load_file(export / "heads.safetensors")
    assert heads and all(not k.startswith("backbone.") for k in heads)

    # the Python API rebuilds the same model from the export alone, without Lightning
    model, config = load_exported(str(export))
    trained = cli.model.model.eval()
    assert config.encoders == cli.model.encoder_settings and config.guidance == cli.model.hparams.guidance
    assert config.sampling == cli.model.sampling and config.heads == cli.model.heads
    g = torch.Generator().manual_seed(0)
    inputs = dict(latents=torch.randn(2, 16, 16, 16, generator=g), timesteps=torch.rand(2, generator=g),
                  **toy_conditioning(2, 3, g))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).velocity, trained(**inputs).velocity, rtol=0, atol=0)
