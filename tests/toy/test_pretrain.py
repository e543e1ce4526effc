import json
import shutil

import torch

from mpp.toy.scenes import ToyWorld


def _copy(bundle, dst):
    shutil.copytree(bundle, dst)
    return dst


def test_pretrain_lowers_loss_deterministic_and_loads(toy_models, tmp_path, capsys):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from mpp.encoders import Encoders
    from mpp.toy.bundle import toy_encoder_settings
    from mpp.toy.pretrain import encode_toy_scenes, pretrain_toy_backbone, toy_flow_loss

    world = ToyWorld(seed=0)
    kwargs = dict(world=world, steps=30, batch_size=8, lr=1e-3, seed=0, num_scenes=64, log_every=0)
    runs = [_copy(toy_models, tmp_path / name) for name in ("a", "b")]
    results = [pretrain_toy_backbone(r, **kwargs) for r in runs]
    res = results[0]
    assert "toy backbone pretraining" in capsys.readouterr().err  # the progress bar
    assert res["steps"] == 30 and res["seconds"] > 0
    assert res["final_loss"] < res["initial_loss"] - 0.1, res
    assert {k: v for k, v in results[1].items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}

    weights = [load_file(str(r / "transformer" / "diffusion_pytorch_model.safetensors")) for r in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    original = load_file(str(toy_models / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(original[k], weights[0][k]) for k in original)
    assert not [p for p in runs[0].iterdir() if p.name.startswith(".")]  # no temp folders left
    assert json.loads((runs[0] / "transformer" / "config.json").read_text())["num_layers"] == 4

    # an independent held-out batch: the reloaded pretrained model beats the random init on it
    encoders = Encoders(toy_encoder_settings(str(toy_models)))
    batch = encode_toy_scenes(encoders, world, range(40_000_000, 40_000_016))
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(batch.latents.shape, generator=g)
    t = torch.full((len(batch),), 0.5)
    with torch.no_grad():
        random_init = FluxTransformer2DModel.from_pretrained(toy_models / "transformer").eval()
        trained = FluxTransformer2DModel.from_pretrained(runs[0] / "transformer").eval()
        before = toy_flow_loss(random_init, batch, noise, t).item()
        after = toy_flow_loss(trained, batch, noise, t).item()
    assert after < before - 0.1, (before, after)


def test_build_with_pretraining_marks_and_rebuilds(tmp_path, monkeypatch):
    import mpp.toy.models as models

    calls = []

    def fake_build(out, *args):
        (out / "transformer").mkdir()

    def fake_pretrain(out, world, seed, steps):
        calls.append(steps)
        assert out.name.startswith(".cache.tmp-")  # inside the temporary build folder
        (out / "pretrain.json").write_text(json.dumps({"steps": steps}))

    monkeypatch.setattr(models, "_build", fake_build)
    monkeypatch.setattr(models, "_pretrain", fake_pretrain)
    cache = tmp_path / "cache"
    models.build_toy_models(cache)
    assert calls == [] and json.loads((cache / models.MARKER_NAME).read_text())["pretrain_steps"] == 0
    models.build_toy_models(cache, pretrain_steps=5)
    assert calls == [5] and json.loads((cache / models.MARKER_NAME).read_text())["pretrain_steps"] == 5
    models.build_toy_models(cache, pretrain_steps=5)
    assert calls == [5]
    models.build_toy_models(cache, pretrain_steps=7)
    assert calls == [5, 7] and json.loads((cache / "pretrain.json").read_text())["steps"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_cli_pretrain_steps(tmp_path, monkeypatch):
    import mpp.toy.__main__ as toy_main

    seen = {}
    monkeypatch.setattr(toy_main, "build_toy_models", lambda path, **kw: seen.update(kw) or path)
    toy_main.main(["models", str(tmp_path / "m"), "--pretrain-steps", "3"])
    assert seen["pretrain_steps"] == 3
