"""File names from user-given identifiers: what a layout id may become on disk."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_STEM = 100


def safe_stem(text: str, fallback: str) -> str:
    """`text` as a plain file name stem: runs of characters other than letters, digits, '.', '_'
    and '-' become '_', no leading '.' or '-', at most MAX_STEM characters; `fallback` when nothing
    is left. Never a path: no separator, never '.', '..' or hidden."""
    stem = _UNSAFE.sub("_", text).lstrip(".-")[:MAX_STEM]
    return stem if stem.strip("_") else fallback


def is_safe_stem(stem: str) -> bool:
    return bool(stem) and safe_stem(stem, "") == stem
