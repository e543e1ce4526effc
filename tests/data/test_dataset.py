"""mpp.data.dataset and the tensor files of mpp.data.layout: reading, finiteness, the worker hand-off."""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch.utils.data import DataLoader, Dataset

from mpp.data.dataset import PreparedDataset, _all_finite, pack, unpack
from mpp.data.layout import read_manifest, read_tensors, sample_path, tensors_to_bytes


def test_tensor_files_round_trip_in_the_stored_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g)}
    path = tmp_path / "x.safetensors"
    path.write_bytes(tensors_to_bytes(tensors, torch.bfloat16))
    back = read_tensors(str(path))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.to(torch.bfloat16))


def test_all_finite_is_exact_even_when_a_sum_overflows():
    assert _all_finite([]) and _all_finite([torch.ones(3).half(), torch.ones(2, 2)])
    big = torch.full((1000,), 65504.0).half()  # its float16 sum overflows; every value is finite
    assert _all_finite([big, torch.full((10,), 3e38)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not _all_finite([torch.ones(2), torch.tensor([1.0, bad]).half()])
        assert not _all_finite([big, torch.tensor([bad]).bfloat16()])
    assert not _all_finite([torch.tensor([float("inf"), -float("inf")])])  # their sum is NaN, not finite


class _Batches(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return pack({"ids": [str(i)], "x": torch.full((4, 3), float(i)).half(), "n": torch.arange(i + 2)})


def test_a_worker_packs_the_batch_into_shared_memory_and_the_main_process_unpacks_it():
    inside = _Batches()[1]["_packed"][0]
    assert not inside.is_shared()  # in the main process a plain buffer (nothing travels)
    batches = [unpack(b) for b in DataLoader(_Batches(), batch_size=None, num_workers=1)]
    assert [b["ids"] for b in batches] == [["0"], ["1"]]
    assert torch.equal(batches[1]["x"], torch.ones(4, 3).half()) and batches[1]["n"].tolist() == [0, 1, 2]


def test_instances_without_a_reference_image_load_without_image_embeddings_unless_foreground(toy_prepared, tmp_path):
    """Generation gives an instance without a reference no image embeddings, so training does not
    either: a background instance's stored crop embedding loads as zeros (the model's null stands
    in); a referenced instance keeps its reference's, and a foreground one without a reference its
    own crop's (a self-reference)."""
    root = tmp_path / "prepared"
    shutil.copytree(toy_prepared, root)
    records = read_manifest(os.path.join(root, "manifest.jsonl"))
    kinds = set()
    for r in records:
        cap = json.load(open(sample_path(str(root), "caption", r["id"])))
        stored = read_tensors(sample_path(str(root), "dino", r["id"]))["embeds"]
        loaded = PreparedDataset(str(root), [r])[0]
        for k, inst in enumerate(cap["instances"]):
            kind = "referenced" if inst["reference"] else "background"
            assert not inst["foreground"] or inst["reference"]  # the toy world references every character
            expected = stored[k] if inst["reference"] else torch.zeros_like(stored[k])
            assert torch.equal(loaded["dino_embeds"][k], expected) and stored[k].abs().sum() > 0
            assert loaded["clip_embeds"][k].abs().sum() > 0 if inst["reference"] else not loaded["clip_embeds"][k].any()
            kinds.add(kind)
    assert kinds == {"referenced", "background"}
    # a foreground instance without a reference keeps its crop's embedding
    r = next(r for r in records if any(not i["reference"] for i in
                                      json.load(open(sample_path(str(root), "caption", r["id"])))["instances"]))
    path = sample_path(str(root), "caption", r["id"])
    cap = json.load(open(path))
    k = next(k for k, i in enumerate(cap["instances"]) if not i["reference"])
    cap["instances"][k]["foreground"] = True
    json.dump(cap, open(path, "w"))
    stored = read_tensors(sample_path(str(root), "dino", r["id"]))["embeds"]
    assert torch.equal(PreparedDataset(str(root), [r])[0]["dino_embeds"][k], stored[k])
