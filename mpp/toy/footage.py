"""Toy footage for `mpp annotate`: toy scenes as the shots of a video file, and a cast folder of
toy characters, with the ground truth kept apart (the annotation never sees it).

Each shot holds one scene for `frames_per_shot` frames, the camera drifting by `jitter` pixels from
frame to frame (so frames within a shot are near-duplicates, not copies). The video is encoded with
PyAV (H.264, 4:2:0 at a high quality by default, as delivered footage is). Cast photos are each
character's reference render at a few sizes, placed off-centre on white.
"""

from __future__ import annotations

import json
import os

import av
import numpy as np
from PIL import Image

from .scenes import ToyWorld


def _drift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image shifted by (dx, dy) pixels, its edge repeated into the gap."""
    h, w = image.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return image[ys][:, xs]


def write_toy_video(path: str, world: ToyWorld, shots: list[int], *, frames_per_shot: int = 6, fps: int = 4,
                    jitter: int = 1, pix_fmt: str = "yuv420p", crf: int = 18) -> dict:
    """Writes scenes `shots` of `world` as consecutive shots of one video; returns its ground truth
    ({"fps", "frames_per_shot", "shots": [{"scene", "first_frame", "instances": [...]}]}): every
    frame of a shot shows the scene drifted by at most `jitter` × (frames_per_shot − 1) pixels."""
    container = av.open(path, "w")
    h, w = world.scene(shots[0]).image.shape[:2] if shots else (world.image_size, world.image_size)
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    stream.options = {"crf": str(crf)}
    truth = {"fps": fps, "frames_per_shot": frames_per_shot, "jitter": jitter, "shots": []}
    for n, index in enumerate(shots):
        scene = world.scene(index)
        for f in range(frames_per_shot):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(_drift(scene.image, jitter * f, 0)), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        truth["shots"].append({"scene": index, "first_frame": n * frames_per_shot, "caption": scene.caption,
                               "instances": [{"bbox": list(i.bbox), "caption": i.caption, "foreground": i.foreground,
                                              "identity": i.identity, "color": list(i.color)}
                                             for i in scene.instances]})
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return truth


def write_toy_cast(cast_dir: str, world: ToyWorld, names: list[str], *, sizes=(64, 48), canvas: int = 96) -> None:
    """CAST_DIR/<character>/<n>.png: each character's reference render at each of `sizes`, off-centre
    on a white `canvas`² photo."""
    for name in names:
        folder = os.path.join(cast_dir, name)
        os.makedirs(folder, exist_ok=True)
        for n, size in enumerate(sizes):
            photo = np.full((canvas, canvas, 3), 255, dtype=np.uint8)
            x0 = (canvas - size) // (2 + n)
            photo[x0:x0 + size, canvas - size - x0:canvas - x0] = world.reference(name, size)
            Image.fromarray(photo).save(os.path.join(folder, f"{n}.png"))


def write_truth(path: str, truth: dict) -> None:
    with open(path, "w") as f:
        json.dump(truth, f)
