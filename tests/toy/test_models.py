import json
import os
import shutil

import pytest
import torch

from mpp.toy.models import MARKER_NAME, SPECIAL_TOKENS, build_toy_models, toy_flux_config
from mpp.toy.scenes import ToyWorld

FOLDERS = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder", "dino", "transformer"]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_marker(toy_models):
    for sub in FOLDERS:
        assert (toy_models / sub).is_dir(), sub
    marker = json.loads((toy_models / MARKER_NAME).read_text())
    assert marker["seed"] == 0 and marker["world"] == ToyWorld(seed=0).config
    for sub in ("image_encoder", "dino"):
        cfg = json.loads((toy_models / sub / "preprocessor_config.json").read_text())
        assert cfg["size"] == 32 and len(cfg["image_mean"]) == 3 and len(cfg["image_std"]) == 3
    temporary = [p for p in toy_models.parent.iterdir() if p.name.startswith(f".{toy_models.name}.")]
    assert not temporary


def test_rebuild_is_noop_and_deterministic(toy_models, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in toy_models.rglob("*")}
    assert build_toy_models(toy_models) == toy_models
    assert {p: p.stat().st_mtime_ns for p in toy_models.rglob("*")} == before
    other = build_toy_models(tmp_path / "again")
    assert _files(other) == _files(toy_models)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import mpp.toy.models as models

    def boom(out, *args):
        (out / "vae").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(models, "_build", boom)
    with pytest.raises(RuntimeError):
        build_toy_models(tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_from_before_the_codec_named_its_class_gets_the_name(toy_models, tmp_path):
    from mpp.encoders import VAE_CLASS_PATH, Encoders
    from mpp.toy.bundle import toy_encoder_settings
    from mpp.toy.codec import PatchCodec

    old = tmp_path / "old"
    shutil.copytree(toy_models, old)
    config_path = old / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    del config[VAE_CLASS_PATH]
    config_path.write_text(json.dumps(config))
    weights = (old / "vae" / "model.safetensors").read_bytes()
    assert build_toy_models(old) == old  # no rebuild
    assert json.loads(config_path.read_text())[VAE_CLASS_PATH] == "mpp.toy.codec.PatchCodec"
    assert (old / "vae" / "model.safetensors").read_bytes() == weights
    assert isinstance(Encoders(toy_encoder_settings(old)).vae, PatchCodec)


def test_stale_marker_triggers_rebuild(toy_models, tmp_path, monkeypatch):
    import mpp.toy.models as models

    stale = tmp_path / "cache"
    shutil.copytree(toy_models, stale)
    marker = json.loads((stale / MARKER_NAME).read_text())
    marker["format_version"] = -1
    (stale / MARKER_NAME).write_text(json.dumps(marker))
    calls = []

    def fake(out, *args):
        calls.append(out)
        (out / "rebuilt").write_text("x")

    monkeypatch.setattr(models, "_build", fake)
    build_toy_models(stale)
    assert calls and (stale / "rebuilt").is_file() and not (stale / "vae").exists()
    assert json.loads((stale / MARKER_NAME).read_text())["format_version"] == models.FORMAT_VERSION
    build_toy_models(stale)
    assert len(calls) == 1


@pytest.fixture(scope="module")
def tokenizer(toy_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_models / "tokenizer")


def test_tokenizer(toy_models, tokenizer):
    from transformers import AutoTokenizer

    world = ToyWorld(seed=0)
    special = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert special == [0, 1, 2, 3]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")]
    assert len(tokenizer) == 4 + len(world.vocabulary())
    assert tokenizer.model_max_length == 32
    longest = 0
    for i in range(50):
        caption = world.scene(i).caption
        ids = tokenizer(caption).input_ids
        assert ids[0] == 2 and ids[-1] == 3 and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
        longest = max(longest, len(ids))
    assert longest <= 32
    assert tokenizer("A RED Circle,").input_ids == tokenizer("a red circle ,").input_ids
    assert tokenizer.unk_token_id in tokenizer("a purple elephant").input_ids
    tok2 = AutoTokenizer.from_pretrained(toy_models / "tokenizer_2")
    assert tok2("a red circle").input_ids == tokenizer("a red circle").input_ids


def test_text_encoders(toy_models, tokenizer):
    from transformers import CLIPTextModel, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(toy_models / "text_encoder").eval()
    assert clip.config.eos_token_id == tokenizer.eos_token_id != 2
    assert clip.config.vocab_size == len(tokenizer) and clip.config.hidden_size == 32
    caps = ["a red striped square and a grey block on a sandy background", "a green bush on a pale blue background",
            "a green bush on a pale green background"]
    full = tokenizer(caps, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    short = tokenizer(caps, padding="longest", return_tensors="pt")
    with torch.no_grad():
        p_full = clip(input_ids=full.input_ids).pooler_output
        p_short = clip(input_ids=short.input_ids, attention_mask=short.attention_mask).pooler_output
    assert p_full.shape == (3, 32)
    assert torch.allclose(p_full, p_short, atol=1e-5)  # padding does not change the pooled output
    assert (p_full[0] - p_full[1]).abs().max() > 1e-2 and (p_full[1] - p_full[2]).abs().max() > 1e-2

    t5 = T5EncoderModel.from_pretrained(toy_models / "text_encoder_2").eval()
    assert t5.config.d_model == toy_flux_config()["joint_attention_dim"]
    with torch.no_grad():
        h = t5(input_ids=full.input_ids, attention_mask=full.attention_mask).last_hidden_state
    assert h.shape == (3, 32, 32) and torch.isfinite(h).all()


def test_image_encoders(toy_models):
    from transformers import CLIPVisionModelWithProjection, Dinov2Model

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clip = CLIPVisionModelWithProjection.from_pretrained(toy_models / "image_encoder").eval()
    dino = Dinov2Model.from_pretrained(toy_models / "dino").eval()
    with torch.no_grad():
        assert clip(pixel_values=x).image_embeds.shape == (2, 32)
        assert dino(pixel_values=x).pooler_output.shape == (2, 64)


def test_transformer_and_codec(toy_models):
    from diffusers import FluxTransformer2DModel

    from mpp.toy.codec import PatchCodec

    flux = FluxTransformer2DModel.from_pretrained(toy_models / "transformer").eval()
    for k, v in toy_flux_config().items():
        got = flux.config[k]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == v, k
    vae = PatchCodec.from_pretrained(toy_models, subfolder="vae")
    assert vae.config.latent_channels * 4 == flux.config.in_channels
    # one forward pass on a 4×4 packed latent grid (= 64×64 pixels)
    b, n, txt = 1, 16, 5
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(n, 1), ids.float()], 1)
    with torch.no_grad():
        out = flux(
            hidden_states=torch.randn(b, n, 64),
            encoder_hidden_states=torch.randn(b, txt, 32),
            pooled_projections=torch.randn(b, 32),
            timestep=torch.tensor([0.5]),
            img_ids=img_ids,
            txt_ids=torch.zeros(txt, 3),
            guidance=torch.tensor([3.5]),
        ).sample
    assert out.shape == (b, n, 64) and torch.isfinite(out).all()


def test_models_deterministic_weights(toy_models):
    from safetensors.torch import load_file

    a = load_file(str(toy_models / "text_encoder" / "model.safetensors"))
    b = load_file(str(toy_models / "image_encoder" / "model.safetensors"))
    # different seeds per model: embeddings are not copies of each other
    assert any(v.std() > 0 for v in a.values()) and a.keys() != b.keys()
    assert os.path.getsize(toy_models / "transformer" / "diffusion_pytorch_model.safetensors") < 20_000_000
