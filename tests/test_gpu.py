"""Training on a CUDA device: bf16 mixed precision with a bf16 backbone, and FSDP (configs/strategy/fsdp.yaml).
Run with `python -m pytest -m gpu` on a machine with a GPU; CI has none."""

import json

import pytest
import torch
from PIL import Image

from mpp.cli import main
from tests.helpers import fit_args, recorder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = ("--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed")


def _checkpoint_then_resume(tmp_path, monkeypatch, toy_models, toy_prepared, *extra,
                            overlays=("tests/conf/fast.yaml",)):
    monkeypatch.chdir(tmp_path)
    first = main(fit_args(1, toy_models, toy_prepared, *GPU, *extra, "--trainer.max_steps=3", overlays=overlays))
    ckpt_path = tmp_path / "runs/checkpoints/stage1/step=0000003.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    assert set(ckpt["state_dict"]) == first.model.owned_keys()
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())
    resumed = main(fit_args(1, toy_models, toy_prepared, *GPU, *extra, "--trainer.max_steps=5",
                            f"--ckpt_path={ckpt_path}", overlays=overlays))
    assert resumed.trainer.global_step == 5
    losses = recorder(first).losses + recorder(resumed).losses
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    return first, resumed


def test_bf16_backbone_trains_checkpoints_and_resumes(tmp_path, monkeypatch, toy_models, toy_prepared):
    first, resumed = _checkpoint_then_resume(tmp_path, monkeypatch, toy_models, toy_prepared,
                                             "--model.backbone_dtype=bfloat16")
    backbone = resumed.model.model.backbone
    assert backbone.x_embedder.weight.dtype == torch.bfloat16
    trainable = [p for p in resumed.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_fsdp_trains_checkpoints_resumes_and_exports(tmp_path, monkeypatch, toy_models, toy_prepared):
    from lightning.pytorch.strategies import FSDPStrategy
    from safetensors.torch import load_file

    first, resumed = _checkpoint_then_resume(tmp_path, monkeypatch, toy_models, toy_prepared,
                                             overlays=("configs/strategy/fsdp.yaml", "tests/conf/fast.yaml"))
    assert isinstance(resumed.trainer.strategy, FSDPStrategy)
    a = torch.load(tmp_path / "runs/checkpoints/stage1/step=0000003.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(tmp_path / "runs/checkpoints/stage1/step=0000005.ckpt", weights_only=False, map_location="cpu")
    assert set(a["state_dict"]) == set(b["state_dict"])
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # it trained on
    # the export holds the final weights, gathered from FSDP's flat parameters
    final = b["state_dict"]
    lora = load_file(tmp_path / "runs/export/stage1/lora.safetensors")
    heads = load_file(tmp_path / "runs/export/stage1/heads.safetensors")
    expected_lora = {"transformer." + k.removeprefix("model.backbone.").replace(".mpp", ""): v
                     for k, v in final.items() if ".lora_" in k}
    expected_heads = {k.removeprefix("model."): v for k, v in final.items() if ".lora_" not in k}
    assert set(lora) == set(expected_lora) and set(heads) == set(expected_heads)
    assert all(torch.equal(lora[k], expected_lora[k]) for k in lora)
    assert all(torch.equal(heads[k], expected_heads[k]) for k in heads)


def test_predict_on_gpu(tmp_path, monkeypatch, toy_models, toy_prepared, toy_world):
    monkeypatch.chdir(tmp_path)
    args = fit_args(1, toy_models, toy_prepared, *GPU, "--trainer.max_steps=1")
    main(args)
    Image.fromarray(toy_world.reference(toy_world.identities[0].name)).save(tmp_path / "ref.png")
    lines = [{"id": f"s{i}", "prompt": s.caption,
              "instances": [{"bbox": list(x.bbox), "caption": x.caption,
                             **({"reference": "ref.png"} if x.foreground else {})}
                            for x in s.instances]}
             for i, s in enumerate(toy_world.scene(k) for k in (3, 4))]
    (tmp_path / "layouts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    main(["predict", *args[1:], "--ckpt_path=runs/checkpoints/stage1/step=0000001.ckpt",
          "--data.predict_file=layouts.jsonl", "--model.sampling.steps=2"])
    report = json.load(open(tmp_path / "runs/generated/stage1/generated.json"))
    assert [r["id"] for r in report["images"]] == ["s0", "s1"] and not report["errors"]
    assert Image.open(tmp_path / "runs/generated/stage1/s0_boxes.png").size == (128, 128)
