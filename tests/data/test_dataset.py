"""mpp.data.dataset and the tensor files of mpp.data.layout: reading, finiteness, the worker hand-off."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from mpp.data.dataset import _all_finite, pack, unpack
from mpp.data.layout import read_tensors, tensors_to_bytes


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
