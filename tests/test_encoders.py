import json
import os
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from mpp.encoders import VAE_CLASS_PATH, EncoderSettings, Encoders, crop_boxes, embedding_dims


@pytest.fixture(scope="module")
def kl_bundle(tmp_path_factory, toy_models):
    """A FLUX-layout folder whose vae/ is a real (tiny, random) AutoencoderKL written by save_pretrained."""
    root = tmp_path_factory.mktemp("flux_kl")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159)
    vae.save_pretrained(root / "vae")
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        os.symlink(os.path.join(toy_models, sub), root / sub)
    return str(root)


def test_autoencoder_kl_loads_from_folder_with_flux_scaling(kl_bundle, toy_settings):
    enc = Encoders(EncoderSettings(**{**toy_settings.to_dict(), "flux": kl_bundle}))
    assert isinstance(enc.vae, AutoencoderKL) and enc.vae_downsample == 8
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = enc.encode_images(x)
    assert latents.shape == (2, 16, 4, 6)
    raw = AutoencoderKL.from_pretrained(os.path.join(kl_bundle, "vae")).encode(x).latent_dist.mode()
    torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611)
    decoded = enc.decode_latents(latents)
    torch.testing.assert_close(decoded, enc.vae.decode(raw).sample)
    assert all(not p.requires_grad for p in enc.vae.parameters())


def test_the_vae_config_names_its_class_by_import_path(toy_settings):
    from mpp.toy.codec import PatchCodec

    config = json.load(open(os.path.join(toy_settings.flux, "vae", "config.json")))
    assert config[VAE_CLASS_PATH] == "mpp.toy.codec.PatchCodec"
    enc = Encoders(toy_settings)
    assert isinstance(enc.vae, PatchCodec) and enc.vae_downsample == 8
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = enc.encode_images(x)
    scale, shift = enc.vae_scale
    torch.testing.assert_close(z, (enc.vae.encode(x) - shift) * scale)


@pytest.mark.parametrize("path", ["mpp.nowhere.Codec", "mpp.encoders.parse_dtype", "PatchCodec"])
def test_a_vae_class_path_that_is_no_module_class_is_refused(toy_models, tmp_path, path):
    root = tmp_path / "bundle"
    shutil.copytree(os.path.join(toy_models, "vae"), root / "vae")
    config = json.loads((root / "vae" / "config.json").read_text())
    (root / "vae" / "config.json").write_text(json.dumps({**config, VAE_CLASS_PATH: path}))
    with pytest.raises(ValueError, match=f"{VAE_CLASS_PATH}.*{path}"):
        _ = Encoders(EncoderSettings(flux=str(root))).vae


def test_text_encoders_batch_independent(toy_settings):
    enc = Encoders(toy_settings)
    prompts = ["a red striped square on a sandy background", "a grey block"]
    states, pooled = enc.encode_prompts(prompts)
    assert states.shape == (2, toy_settings.t5_max_length, 32) and pooled.shape == (2, 32)
    one_states, one_pooled = enc.encode_prompts(prompts[:1])
    torch.testing.assert_close(one_states[0], states[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_pooled[0], pooled[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])
    assert enc.encode_texts_pooled([]).shape == (0, 32)


def test_image_embeds_shapes_and_dino_is_differentiable(toy_settings):
    enc = Encoders(toy_settings)
    g = torch.Generator().manual_seed(0)
    crops = (torch.rand(3, 3, 40, 40, generator=g) * 2 - 1).requires_grad_()
    assert enc.clip_image_embeds(crops).shape == (3, 32)
    d = enc.dino_embeds(crops)
    assert d.shape == (3, 64)  # the toy DINOv2 is 64 wide (mpp.toy.models.VISION_HIDDEN)
    # A fixed random projection: the sum of a normalised output is (almost) constant, so its
    # gradient can vanish; a projection onto a direction cannot.
    direction = torch.randn(64, generator=g)
    (d @ direction).sum().backward()
    assert crops.grad is not None and crops.grad.abs().mean() > 1e-6


def test_crop_boxes_takes_the_box_with_margin():
    img = torch.zeros(1, 3, 8, 8)
    img[:, :, 2:6, 4:8] = 1.0  # the box x∈[0.5, 1], y∈[0.25, 0.75]
    box = torch.tensor([[[0.5, 0.25, 1.0, 0.75]]])
    crop = crop_boxes(img, box, size=4)
    torch.testing.assert_close(crop, torch.ones(1, 1, 3, 4, 4))
    with_margin = crop_boxes(img, box, size=6, margin=0.5)  # x0 → 0.25: the left third is outside
    assert with_margin[0, 0, 0, :, 0].max() < 0.5 and with_margin[0, 0, 0, 3, -1] == 1.0


def test_missing_encoders_name_their_flag(toy_settings, tmp_path):
    (tmp_path / "empty").mkdir()
    settings = EncoderSettings(**{**toy_settings.to_dict(), "dino": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="data.encoders.dino: cannot load DINOv2"):
        _ = Encoders(settings).dino
    with pytest.raises(ValueError, match="data.encoders.dino: cannot load the DINOv2 config"):
        embedding_dims(settings)
