import numpy as np
import pytest
import torch

from mpp.toy.codec import PatchCodec, psnr
from mpp.toy.scenes import ToyWorld

PSNR_MIN = 21.5  # measured ≈ 23 dB on held-out scenes (16 components of 8×8×3 patches)


def _images(world, indices):
    x = np.stack([world.scene(i).image for i in indices])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def world():
    return ToyWorld(seed=0)


@pytest.fixture(scope="module")
def codec(world):
    return PatchCodec.fit(_images(world, range(10_000_000, 10_000_128)))


@pytest.fixture(scope="module")
def held_out(world):
    return _images(world, range(64))


def test_config_and_shapes(codec, held_out):
    assert codec.downsample_factor == codec.config.patch_size == 8
    assert codec.config.latent_channels == 16
    z = codec.encode(held_out)
    assert z.shape == (64, 16, 16, 16)
    assert codec.decode(z).shape == held_out.shape
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(1, 3, 12, 16))


def test_reconstruction_psnr(codec, held_out):
    value = psnr(codec.decode(codec.encode(held_out)), held_out)
    print(f"\ncodec PSNR on 64 held-out scenes: {value:.2f} dB")
    assert value > PSNR_MIN


def test_components_orthonormal_and_sign_fixed(codec):
    c = codec.components.double()
    assert torch.allclose(c @ c.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
    idx = c.abs().argmax(1)
    assert (c[torch.arange(16), idx] > 0).all()


def test_fit_deterministic(world, codec):
    again = PatchCodec.fit(_images(world, range(10_000_000, 10_000_128)))
    assert torch.equal(again.components, codec.components) and torch.equal(again.mean, codec.mean)
    assert torch.equal(again.channel_std, codec.channel_std)
    assert again.config == codec.config


def test_scaled_latents_standardised(codec, held_out):
    z = (codec.encode(held_out) - codec.config.shift_factor) * codec.config.scaling_factor
    assert abs(z.mean().item()) < 0.1
    assert 0.85 < z.std().item() < 1.15
    # whitened: every channel near unit variance, though the raw PCA variances fall by ~100×
    per_channel = z.std(dim=(0, 2, 3))
    assert ((per_channel > 0.7) & (per_channel < 1.3)).all(), per_channel
    assert (codec.channel_std[1:] <= codec.channel_std[:-1]).all() and codec.channel_std[0] > 5 * codec.channel_std[-1]


def test_save_load_round_trip(codec, held_out, tmp_path):
    codec.save_pretrained(tmp_path / "bundle" / "vae")
    import json

    cfg = json.loads((tmp_path / "bundle" / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "PatchCodec" and cfg["scaling_factor"] == codec.config.scaling_factor
    assert (tmp_path / "bundle" / "vae" / "model.safetensors").is_file()
    loaded = PatchCodec.from_pretrained(tmp_path / "bundle", subfolder="vae")
    assert loaded.config == codec.config
    x = held_out[:4]
    assert torch.equal(loaded.encode(x), codec.encode(x))
    z = codec.encode(x)
    assert torch.equal(loaded.decode(z), codec.decode(z))
    half = PatchCodec.from_pretrained(tmp_path / "bundle" / "vae", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.decode(z).dtype == torch.bfloat16


def test_decode_differentiable_and_linear(codec):
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    out = codec.decode(z)
    out.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    z1, z2 = torch.randn(2, 1, 16, 4, 4)
    zero = torch.zeros(1, 16, 4, 4)
    lhs = codec.decode(z1 + z2) - codec.decode(zero)
    rhs = (codec.decode(z1) - codec.decode(zero)) + (codec.decode(z2) - codec.decode(zero))
    assert torch.allclose(lhs, rhs, atol=1e-5)
