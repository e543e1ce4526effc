"""The kohya-format LoRA: diffusers' kohya converter turns it back into mpp's LoRA exactly, the fused
modules that ComfyUI applies carry the stacked per-module deltas, and it is refused for a
layout-branch LoRA."""

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

from mpp.__main__ import main as mpp_main
from mpp.cli import main
from mpp.export_kohya import KOHYA_NAME, read_kohya, write_kohya
from mpp.nn.lora import lora_target_modules
from tests.helpers import export_command, fit_args, train_toy_checkpoint

FLUX_WIDTH = 3072  # FLUX.1's attention width: diffusers' converter knows only its sizes


def _random_lora(width: int, rank: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for module in lora_target_modules([0, 1], [0]):
        lora[f"{module}.lora_A.weight"] = torch.randn(rank, width, generator=g)
        lora[f"{module}.lora_B.weight"] = torch.randn(width, rank, generator=g)
    return lora


def test_kohya_file_converts_back_through_diffusers_to_the_same_lora_at_flux_sizes(tmp_path):
    lora = _random_lora(FLUX_WIDTH, rank=4)
    path = str(tmp_path / KOHYA_NAME)
    write_kohya(path, lora)
    written = load_file(path)
    assert all(k.startswith("lora_unet_") for k in written)
    assert written["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * FLUX_WIDTH, 16)
    assert written["lora_unet_double_blocks_1_img_attn_qkv.alpha"].item() == 12.0  # rank 3 × 4: scale 1

    converted = FluxPipeline.lora_state_dict(path)  # diffusers detects the kohya keys and converts
    converted = converted[0] if isinstance(converted, tuple) else converted
    for key, value in lora.items():
        assert torch.equal(converted[f"transformer.{key}"], value), key
    extra = set(converted) - {f"transformer.{k}" for k in lora}
    assert extra == {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
                     "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"}
    assert not converted["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"].any()  # no MLP delta
    assert read_kohya(path).keys() == lora.keys()


def test_kohya_fused_modules_apply_the_stacked_deltas_of_their_parts(tmp_path):
    """ComfyUI and Forge add up @ down · alpha / rank to BFL's fused qkv and linear1 weights."""
    lora = _random_lora(32, rank=2, seed=1)
    path = str(tmp_path / KOHYA_NAME)
    write_kohya(path, lora)
    w = load_file(path)

    def delta(name):
        down, up = w[f"{name}.lora_down.weight"], w[f"{name}.lora_up.weight"]
        return up @ down * w[f"{name}.alpha"] / down.shape[0]

    def part(module):
        return lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]

    qkv = torch.cat([part(f"transformer_blocks.1.attn.{m}") for m in ("add_q_proj", "add_k_proj", "add_v_proj")])
    torch.testing.assert_close(delta("lora_unet_double_blocks_1_txt_attn_qkv"), qkv, rtol=1e-6, atol=1e-6)
    linear1 = torch.cat([*(part(f"single_transformer_blocks.0.attn.{m}") for m in ("to_q", "to_k", "to_v")),
                         torch.zeros(4 * 32, 32)])
    torch.testing.assert_close(delta("lora_unet_single_blocks_0_linear1"), linear1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta("lora_unet_double_blocks_0_img_attn_proj"),
                               part("transformer_blocks.0.attn.to_out.0"), rtol=1e-6, atol=1e-6)


def test_kohya_reader_names_a_module_it_does_not_know(tmp_path):
    save_file({"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors: 'lora_unet_final_layer_linear'"):
        read_kohya(str(tmp_path / "other.safetensors"))


def test_kohya_export_of_a_trained_model_holds_its_lora_at_the_trained_scale(in_tmp, toy_models, toy_prepared):
    ckpt, args = train_toy_checkpoint(in_tmp, toy_models, toy_prepared, "--model.heads.lora_scope=all",
                                      "--model.heads.lora_alpha=12", steps=2)
    out = in_tmp / "exports/kohya"
    assert mpp_main([*export_command(args), "--ckpt_path", ckpt, "--out", str(out), "--kohya"]) == 0
    diffusers_format = {k.removeprefix("transformer."): v for k, v in load_file(out / "lora.safetensors").items()}
    back = read_kohya(str(out / KOHYA_NAME))
    assert back.keys() == diffusers_format.keys()
    for key, value in diffusers_format.items():  # both carry alpha 12 / rank 4 folded into B
        assert torch.equal(back[key], value), key
    state = torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]
    a = state["model.backbone.transformer_blocks.0.attn.to_q.lora_A.mpp.weight"]
    b = state["model.backbone.transformer_blocks.0.attn.to_q.lora_B.mpp.weight"]
    torch.testing.assert_close(back["transformer_blocks.0.attn.to_q.lora_B.weight"] @ back[
        "transformer_blocks.0.attn.to_q.lora_A.weight"], b @ a * 3.0, rtol=1e-6, atol=1e-7)


def test_kohya_export_of_a_layout_branch_lora_is_refused_before_training(in_tmp, toy_models, toy_prepared):
    args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2")
    with pytest.raises(ValueError, match=r"--export.kohya: a kohya file .*heads.lora_scope: layout"):
        main([*args, "--export.kohya=true"])
    assert not (in_tmp / "runs/checkpoints/stage1").exists() or not any((in_tmp / "runs/checkpoints/stage1").iterdir())
