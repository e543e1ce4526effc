"""The export: loaders apply its LoRA at the trained scale, plain loaders refuse the layout-branch LoRA,
`mpp export` exports any checkpoint, and `load_exported` rebuilds the trained model without Lightning."""

import json
import logging
import os

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from mpp.__main__ import main as mpp_main
from mpp.cli import main
from mpp.export import load_exported
from mpp.toy.bundle import toy_encoder_settings
from tests.helpers import export_command, fit_args, save_tiny_flux_pipeline, toy_conditioning, train_toy_checkpoint


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


def _lora_deltas(lora: dict, scale: float = 1.0) -> dict:
    """{module: B @ A · scale} of peft-named LoRA weights (any prefix before the module)."""
    return {k.removesuffix(".lora_A.weight"): lora[k.replace(".lora_A.", ".lora_B.")] @ v * scale
            for k, v in lora.items() if k.endswith(".lora_A.weight")}


def test_lora_alpha_scale_is_folded_so_diffusers_and_a_plain_reader_apply_the_trained_delta(
        in_tmp, toy_models, toy_prepared):
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", "--model.heads.lora_scope=all",
                        "--model.heads.lora_alpha=12"))
    export = in_tmp / "runs/export/stage1"
    assert not (export / "lora_layout_branch.safetensors").exists()
    assert json.loads((export / "config.json").read_text())["lora_scale_folded"] == 3.0  # alpha 12 / rank 4
    trained = _lora_deltas(cli.model.model.lora_state_dict(), scale=3.0)
    assert trained and any(d.abs().max() > 0 for d in trained.values())
    # a loader that reads no alpha at all (ComfyUI without `.alpha` keys applies B·A) gets the trained delta
    in_file = {k.removeprefix("transformer."): v for k, v in load_file(export / "lora.safetensors").items()}
    plain = _lora_deltas(in_file)
    assert plain.keys() == trained.keys()
    for name, delta in trained.items():
        torch.testing.assert_close(plain[name], delta, rtol=1e-6, atol=1e-7)
    # diffusers reads alpha = r from the metadata: scale 1 on the folded B, the same delta
    fresh = FluxTransformer2DModel.from_pretrained(toy_models, subfolder="transformer")
    fresh.load_lora_adapter(str(export), weight_name="lora.safetensors", prefix="transformer", adapter_name="mpp")
    scales = {m.scaling["mpp"] for m in fresh.modules() if hasattr(m, "scaling") and "mpp" in m.scaling}
    assert scales == {1.0}
    loaded = _lora_deltas({n.replace(".mpp", ""): p.detach() for n, p in fresh.named_parameters() if "lora_" in n})
    assert loaded.keys() == trained.keys()
    for name, delta in trained.items():
        torch.testing.assert_close(loaded[name], delta, rtol=1e-6, atol=1e-7)
    # mpp takes the factor back out and rebuilds the adapter at its trained alpha (B·3/3: last-bit rounding)
    model, _ = load_exported(str(export))
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).velocity, cli.model.model.eval()(**_inputs()).velocity,
                                   rtol=1e-5, atol=1e-6)


def test_a_layout_branch_export_is_refused_by_a_plain_flux_pipeline(in_tmp, toy_models, toy_prepared):
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2"))
    export = in_tmp / "runs/export/stage1"
    keys = list(load_file(export / "lora_layout_branch.safetensors"))
    assert keys and all(k.startswith("mpp_layout_branch.") and "lora" not in k for k in keys)
    pipe = FluxPipeline.from_pretrained(save_tiny_flux_pipeline(in_tmp / "pipe"))
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(export), weight_name="lora_layout_branch.safetensors")
    assert not pipe.get_list_adapters()


def test_mpp_export_writes_the_export_of_a_mid_run_checkpoint(in_tmp, toy_models, toy_prepared):
    ckpt, args = train_toy_checkpoint(in_tmp, toy_models, toy_prepared, "--model.heads.lora_scope=all",
                                      "--model.heads.lora_alpha=8", steps=3)
    mid = ckpt.replace("step=0000003", "step=0000001")
    out = in_tmp / "exports/step1"
    assert mpp_main([*export_command(args), "--ckpt_path", mid, "--out", str(out)]) == 0
    state = torch.load(mid, weights_only=False, map_location="cpu")["state_dict"]
    in_file = {k.removeprefix("transformer."): v for k, v in load_file(out / "lora.safetensors").items()}
    from_ckpt = {k.removeprefix("model.backbone.").replace(".mpp.", "."): v for k, v in state.items() if ".lora_" in k}
    expected = _lora_deltas(from_ckpt, scale=2.0)  # alpha 8 / rank 4
    assert expected.keys() == _lora_deltas(in_file).keys()
    for name, delta in expected.items():
        torch.testing.assert_close(_lora_deltas(in_file)[name], delta, rtol=1e-6, atol=1e-7)
    heads = load_file(out / "heads.safetensors")
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in heads.items())
    final = torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]
    assert any(not torch.equal(v, final[f"model.{k}"]) for k, v in heads.items())  # the mid-run weights, not the last
    with pytest.raises(ValueError, match="already holds an export"):
        mpp_main([*export_command(args), "--ckpt_path", mid, "--out", str(out)])


def test_the_diffusers_floor_has_the_lora_metadata_api_the_export_writes_with():
    """pyproject's floor is diffusers 0.35: 0.34 is the first release whose save_lora_weights takes the
    adapter metadata (0.33 has no such argument), 0.35 the first whose FluxAttention has the head_dim
    mpp.nn uses. On 0.35.2 this file passes but for the tiny FluxPipeline's tokenizer (decisions.md)."""
    import inspect

    assert "transformer_lora_adapter_metadata" in inspect.signature(FluxPipeline.save_lora_weights).parameters
