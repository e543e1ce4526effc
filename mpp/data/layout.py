"""The prepared dataset's files: where each tensor lives, the manifest and prepare.json."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings

import torch
from safetensors.torch import load, save

FORMAT_VERSION = 1

FILES = {
    "image": ("images", ".png"),
    "caption": ("captions", ".json"),
    "latents": ("latents/vae_full_images", ".safetensors"),
    "clip": ("embedding/clip_cropped_boxes", ".safetensors"),
    "dino": ("embedding/dino_cropped_boxes", ".safetensors"),
    "text": ("embedding/text", ".safetensors"),
}


def sample_path(root: str, kind: str, sample_id: str) -> str:
    folder, ext = FILES[kind]
    return os.path.join(root, folder, sample_id + ext)


def tensors_to_bytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """One sample's tensor file (safetensors), every tensor stored as `dtype`."""
    return save({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()})


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """A tensor file written by :func:`tensors_to_bytes`. The whole file is read, then parsed: for a
    sample's small files this is about 3× faster than ``safetensors.torch.load_file``'s memory map."""
    with open(path, "rb") as f:
        return load(f.read())


def shard_manifest_name(shard_index: int, num_shards: int) -> str:
    if num_shards == 1:
        return "manifest.jsonl"
    return f"manifest.shard-{shard_index:05d}-of-{num_shards:05d}.jsonl"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DiskFullError(OSError):
    """A write found no space left on its device; the message names the folder and the bytes."""

    def __str__(self) -> str:
        return self.strerror


def _no_space(e: BaseException | None) -> bool:
    """Whether `e` or an exception it was raised from is ENOSPC (torch's zip writer reports a full
    disk as "unexpected pos", with the OSError only as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def atomic_write(path: str, write, *, size_hint: int | None = None, fixed_temporary: bool = False) -> None:
    """Calls write(file object) on a temporary file beside `path`, fsyncs, then renames it over `path`.
    A full disk is a DiskFullError naming the folder, the space free and (`size_hint`) the bytes needed.
    `fixed_temporary`: the temporary is `.tmp-<name>`, not a unique name, so the next write of the same
    file takes over what a killed one left (for a writer that alone writes `path`, as a shard its samples)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    if fixed_temporary:
        tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    else:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _no_space(e):
            need = f"about {size_hint} bytes needed, " if size_hint else ""
            raise DiskFullError(errno.ENOSPC, f"no space left in {os.path.abspath(folder)} writing "
                                f"{os.path.basename(path)} ({need}{shutil.disk_usage(folder).free} free)") from e
        raise


def atomic_write_json(path: str, data) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def read_manifest(path: str) -> list[dict]:
    """Records of a manifest. A truncated last line (a killed writer) is dropped with a warning;
    a malformed line elsewhere is an error naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping truncated last line {i + 1}", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1}: malformed manifest line ({e})") from e
    return records


def write_manifest(path: str, records: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()))


def record_is_complete(root: str, record: dict) -> bool:
    """True when every file of the record exists and has the hash the manifest holds."""
    for kind, digest in record["files"].items():
        path = sample_path(root, kind, record["id"])
        if not os.path.exists(path) or file_sha256(path) != digest:
            return False
    return True


def read_prepare_info(root: str) -> dict | None:
    path = os.path.join(root, "prepare.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def portable_identity(identity: dict) -> dict:
    """`EncoderSettings.identity()` without the paths of the local folders it fingerprints: two copies of
    the same encoders in different folders are the same encoders (a moved dataset stays valid)."""
    fingerprints = identity.get("fingerprints", {})
    local = {key.split("/")[0] for key in fingerprints}
    return {k: ("<local folder>" if k in local else v) for k, v in identity.items()}


def same_info_value(key: str, a, b) -> bool:
    """Whether two prepare.json values agree; encoders by their weights' fingerprints and settings,
    not by where their folders are."""
    if key == "encoders" and isinstance(a, dict) and isinstance(b, dict):
        return portable_identity(a) == portable_identity(b)
    return a == b


def check_prepare_info(root: str, expected: dict) -> None:
    """Refuses a dataset prepared with other encoder settings or resolution than `expected`."""
    info = read_prepare_info(root)
    if info is None:
        raise ValueError(f"{root}: no prepare.json; prepare the dataset with `python -m mpp.prepare` first")
    differing = {k: (info.get(k), v) for k, v in expected.items() if not same_info_value(k, info.get(k), v)}
    if differing:
        lines = "\n".join(f"  {k}: dataset has {a!r}, config asks for {b!r}" for k, (a, b) in differing.items())
        raise ValueError(f"{os.path.join(root, 'prepare.json')} was prepared with other settings than the "
                         f"config:\n{lines}")
