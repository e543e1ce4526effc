"""The toy bundle that ships with mpp (`mpp/toy/pretrained/`), written and read here.

Building the bundle that `configs/toy.yaml` asks for pretrains the toy vision encoders and backbone,
about 20 minutes on two cores, and its floats differ from machine to machine. So the repository
carries the bundle its benchmark figures were measured on, with a manifest of each file's SHA-256:
`mpp.toy.models.build_toy_models` copies it into the cache when its marker is the one asked for
(checking every file against the manifest first), and builds only what it does not match.

    python -m mpp.toy ship .cache/toy/models   # after rebuilding it: the shipped bundle becomes that one
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mpp.data.layout import file_sha256

SHIPPED_DIR = Path(__file__).with_name("pretrained")
MARKER_NAME = "mpp_toy.json"
MANIFEST_NAME = "MANIFEST.json"


def read_marker(bundle: Path) -> dict | None:
    """A bundle's marker (`mpp_toy.json`: what it was built for); None when it has none."""
    try:
        return json.loads((Path(bundle) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _files(bundle: Path) -> list[str]:
    return sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def read_manifest(shipped: Path | None = None) -> dict | None:
    shipped = shipped or SHIPPED_DIR
    try:
        return json.loads((shipped / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def copy_shipped(dest: Path, marker: dict, shipped: Path | None = None) -> bool:
    """Copies the shipped bundle (`shipped`, default SHIPPED_DIR) into the empty folder `dest` when it
    was built for `marker`; False (nothing copied) when it was built for another or none ships. A
    shipped file that differs from the manifest (an edited file, a checkout without it) is a
    ValueError naming it."""
    shipped = shipped or SHIPPED_DIR
    manifest = read_manifest(shipped)
    if manifest is None or read_marker(shipped) != marker:
        return False
    listed = manifest["files"]
    for name in sorted(set(listed) | set(_files(shipped))):
        path = shipped / name
        if name not in listed or not path.is_file() or file_sha256(path) != listed[name]:
            raise ValueError(f"{path}: not the file {shipped / MANIFEST_NAME} lists (edited, missing or extra); "
                             "restore it (git checkout), or build the bundle here with "
                             "`python -m mpp.toy models CACHE_DIR --overwrite`")
    for name in listed:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shipped / name, dest / name)
    return True


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def ship_bundle(bundle: str | os.PathLike, shipped: Path | None = None, *, note: str = "") -> Path:
    """Makes the complete bundle in `bundle` the shipped one: its files and a manifest of their
    hashes, replacing the shipped folder whole. `note`: where and how it was built (the manifest
    keeps it, with the commit)."""
    bundle, shipped = Path(bundle), shipped or SHIPPED_DIR
    if read_marker(bundle) is None:
        raise ValueError(f"{bundle} is not a complete toy bundle (no {MARKER_NAME})")
    shipped.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shipped.name}.tmp-", dir=shipped.parent))
    try:
        files = {}
        for name in _files(bundle):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle / name, tmp / name)
            files[name] = file_sha256(tmp / name)
        manifest = {"files": files, "commit": _commit(), "note": note}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if shipped.exists():
            shutil.rmtree(shipped)
        os.replace(tmp, shipped)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shipped
