"""Recurring identities that the cast does not name: the unlinked foreground boxes are clustered by
DINOv2 similarity (agglomerative, average linkage on cosine distance, scikit-learn), and every
cluster of at least `min_size` boxes goes on a contact sheet for the user.

RAW/annotate/clusters.json lists each cluster with its boxes ("<frame id>#<box index>") and two
fields to edit: `name` (a cast member's name to link the boxes to, or a new name: the box nearest
the cluster's centre becomes its reference) and `drop` (true: the boxes leave the layout). Two
clusters given one name are merged. `mpp annotate ... --clusters clusters.json` applies the edits;
they refer to boxes, not cluster numbers, so they apply whatever a new clustering would number.
RAW/annotate/contact_sheet.png shows each cluster as a row of its boxes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from sklearn.cluster import AgglomerativeClustering
from torch import Tensor

SHEET_TILE, SHEET_PER_ROW = 64, 10


@dataclass
class Cluster:
    id: str
    members: list[str]  # "<frame id>#<box index>"
    center: str  # the member nearest the mean embedding
    name: str | None = None
    drop: bool = False


def cluster(keys: list[str], embeds: Tensor, *, distance: float, min_size: int) -> list[Cluster]:
    """Clusters of at least `min_size` of the boxes `keys` (K×D unit `embeds`), largest first."""
    if len(keys) < max(2, min_size):
        return []
    x = embeds.numpy().astype(np.float64)
    labels = AgglomerativeClustering(n_clusters=None, distance_threshold=distance, metric="cosine",
                                     linkage="average").fit_predict(x)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    groups = sorted((g for g in groups if len(g) >= min_size), key=lambda g: (-len(g), keys[g[0]]))
    out = []
    for n, g in enumerate(groups, 1):
        mean = x[g].mean(0)
        out.append(Cluster(f"c{n:03d}", [keys[i] for i in g], keys[g[int((x[g] @ mean).argmax())]]))
    return out


def write_clusters(path: str, clusters: list[Cluster]) -> None:
    doc = {"_edit": "set a cluster's name to link its boxes to that cast member (or a new character: the box "
                    "nearest its centre becomes the reference; one name on two clusters merges them), or drop: "
                    "true to take its boxes out of the layout; then rerun mpp annotate with --clusters this file",
           "clusters": [{"id": c.id, "size": len(c.members), "name": c.name, "drop": c.drop, "center": c.center,
                         "members": c.members} for c in clusters]}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def read_edits(path: str) -> list[Cluster]:
    """The clusters of an edited clusters.json; ValueError naming the file and cluster when malformed."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--clusters {path}: unreadable ({e})") from e
    out = []
    for k, c in enumerate(doc.get("clusters", []) if isinstance(doc, dict) else []):
        where = f"--clusters {path}: cluster {k} ({c.get('id') if isinstance(c, dict) else c!r})"
        if not isinstance(c, dict) or not isinstance(c.get("members"), list) or not c["members"]:
            raise ValueError(f"{where}: needs a non-empty 'members' list")
        name = c.get("name")
        plain = isinstance(name, str) and name.strip() and os.sep not in name and not name.startswith(".")
        if name is not None and not plain:
            raise ValueError(f"{where}: 'name' must be a plain name (a folder name) or null, got {name!r}")
        out.append(Cluster(str(c.get("id", f"c{k + 1:03d}")), [str(m) for m in c["members"]],
                           str(c.get("center") or c["members"][0]), name, bool(c.get("drop", False))))
    if isinstance(doc, dict) and "clusters" not in doc:
        raise ValueError(f"--clusters {path}: no 'clusters' list")
    return out


def contact_sheet(path: str, clusters: list[Cluster], crop_of) -> None:
    """A PNG with one row per cluster: its id and size, then up to SHEET_PER_ROW of its boxes
    (`crop_of(key)` → H×W×3 uint8)."""
    label_w = 90
    rows = max(1, len(clusters))
    sheet = Image.new("RGB", (label_w + SHEET_PER_ROW * SHEET_TILE, rows * SHEET_TILE), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, c in enumerate(clusters):
        draw.text((4, r * SHEET_TILE + 4), f"{c.id}\n{len(c.members)} boxes", fill=(0, 0, 0))
        for i, key in enumerate(c.members[:SHEET_PER_ROW]):
            tile = Image.fromarray(crop_of(key)).resize((SHEET_TILE - 2, SHEET_TILE - 2), Image.BILINEAR)
            sheet.paste(tile, (label_w + i * SHEET_TILE + 1, r * SHEET_TILE + 1))
    tmp = f"{path}.tmp.png"
    sheet.save(tmp)
    os.replace(tmp, path)


def purity(clusters: list[Cluster], truth: dict[str, str]) -> float | None:
    """Share of clustered boxes (of those `truth` names) that belong to their cluster's majority identity."""
    total = agree = 0
    for c in clusters:
        named = [truth[m] for m in c.members if m in truth]
        if named:
            total += len(named)
            agree += max(named.count(v) for v in set(named))
    return agree / total if total else None
