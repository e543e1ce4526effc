"""Frames from footage: every image of a folder, and from each video file the first frame of every
shot plus one every `stride` seconds within it, near-duplicates of the last kept frame dropped.

A shot boundary is a jump in the colour histogram between consecutive decoded frames
(`FrameSettings.cut_threshold`); a near-duplicate is a frame whose 32×32 grey thumbnail differs from
the last kept one by less than `dup_threshold` (mean absolute difference, 0-1). Videos are decoded
with PyAV.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from mpp.data.raw import IMAGE_EXTS

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mxf")


@dataclass(frozen=True)
class FrameSettings:
    """Args:
        stride: seconds between sampled frames within a shot (the shot's first frame is always sampled).
        cut_threshold: histogram distance (half the L1 distance of 8-bin-per-channel histograms, 0-1)
            between consecutive frames above which a new shot starts.
        dup_threshold: a frame whose thumbnail differs from the last kept frame's by less than this
            (mean absolute difference, 0-1) is dropped as a near-duplicate (0: keep all).
    """

    stride: float = 2.0
    cut_threshold: float = 0.15
    dup_threshold: float = 0.02

    def __post_init__(self):
        if not self.stride > 0:
            raise ValueError(f"--stride must be > 0 seconds, got {self.stride}")
        if not 0 < self.cut_threshold <= 1:
            raise ValueError(f"--cut_threshold must be in (0, 1], got {self.cut_threshold}")
        if not 0 <= self.dup_threshold < 1:
            raise ValueError(f"--dup_threshold must be in [0, 1), got {self.dup_threshold}")


@dataclass
class Frame:
    id: str  # <video stem>-<frame index> or the image's stem
    image: np.ndarray  # H×W×3 uint8
    source: str  # the file it came from
    time: float | None = None  # seconds into the video
    shot: int | None = None  # shot number within the video


@dataclass
class Dropped:
    id: str
    source: str
    reason: str


def list_sources(path: str) -> list[str]:
    """The video files and images of `path` (a file or a folder, not recursive), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"FRAMES_OR_VIDEOS {path!r} is neither a file nor a folder")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(VIDEO_EXTS + IMAGE_EXTS))
    if not names:
        raise ValueError(f"FRAMES_OR_VIDEOS {path!r} holds no video ({', '.join(VIDEO_EXTS)}) or image file")
    return [os.path.join(path, n) for n in names]


def histogram(image: np.ndarray) -> np.ndarray:
    bins = (image[..., :3] // 32).reshape(-1, 3).astype(np.int64)
    counts = np.bincount(bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2], minlength=512)
    return counts / counts.sum()


def thumbnail(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def video_frames(path: str, settings: FrameSettings) -> Iterator[Frame | Dropped]:
    """The sampled frames of one video (Dropped for each near-duplicate). Raises ValueError naming
    the file when it cannot be decoded."""
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: unreadable video ({e})") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        previous, kept, shot, next_time, index = None, None, -1, 0.0, -1
        try:
            for frame in container.decode(stream):
                index += 1
                image = frame.to_ndarray(format="rgb24")
                t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
                hist = histogram(image)
                if previous is None or 0.5 * np.abs(hist - previous).sum() > settings.cut_threshold:
                    shot, next_time = shot + 1, t
                previous = hist
                if t + 1e-6 < next_time:
                    continue
                next_time = t + settings.stride
                fid = f"{_stem(path)}-{index:06d}"
                thumb = thumbnail(image)
                if kept is not None and float(np.abs(thumb - kept).mean()) < settings.dup_threshold:
                    yield Dropped(fid, path, "near-duplicate of the last kept frame")
                    continue
                kept = thumb
                yield Frame(fid, image, path, time=round(t, 3), shot=shot)
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: the video cannot be decoded past frame {index} ({e})") from e
    if index < 0:
        raise ValueError(f"{path}: the video holds no frame")


def image_frame(path: str) -> Frame:
    try:
        with Image.open(path) as im:
            return Frame(_stem(path), np.asarray(im.convert("RGB")), path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from e


def frames(sources: list[str], settings: FrameSettings) -> Iterator[Frame | Dropped | ValueError]:
    """Every frame of `sources` in order; a source that cannot be read yields its ValueError (the
    others go on), and an image too like the last kept one is Dropped as a video frame would be."""
    kept = None
    for path in sources:
        if not path.lower().endswith(VIDEO_EXTS):
            try:
                frame = image_frame(path)
            except ValueError as e:
                yield e
                continue
            thumb = thumbnail(frame.image)
            if kept is not None and float(np.abs(thumb - kept).mean()) < settings.dup_threshold:
                yield Dropped(frame.id, path, "near-duplicate of the last kept frame")
                continue
            kept = thumb
            yield frame
            continue
        try:
            yield from video_frames(path, settings)
        except ValueError as e:
            yield e
