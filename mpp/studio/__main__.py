"""`mpp studio`: the layout editor in the browser, over a trained checkpoint or an export.

    mpp studio --config configs/stage1.yaml [--config configs/toy.yaml] --ckpt_path CKPT \\
        [--cast CAST_DIR] [--out runs/studio] [--host 127.0.0.1] [--port 7860] [--key=value overrides]
    mpp studio --export runs/export/stage1 --resolution 1024 [--cast CAST_DIR] ...

It serves a local page (127.0.0.1 unless --host says otherwise) where a shot is drawn, generated with
the same code and pixels as `mpp generate`, and kept in a shot list: `<out>/shots.jsonl`, which
`mpp generate --layouts` renders in batch. Everything it writes is under --out.
"""

from __future__ import annotations

import argparse
import logging
import os

from .app import build_app
from .session import Studio, cast_gallery, load_checkpoint_engine, load_export_engine

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="mpp studio", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=[], help="stage config and overlays, in order")
    p.add_argument("--ckpt_path", help="a training checkpoint of that stage")
    p.add_argument("--export", help="an export folder (runs/export/stageN) instead of --config and --ckpt_path")
    p.add_argument("--resolution", type=int, default=1024, help="with --export: the training square's side")
    p.add_argument("--cast", help="one subfolder of photos per character, shown as a gallery of references")
    p.add_argument("--out", default="runs/studio", help="the output folder: images, shots.jsonl, generated.json")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    a, overrides = p.parse_known_args(argv)
    if a.export:
        if a.config or a.ckpt_path:
            p.error("give --export, or --config with --ckpt_path, not both")
    elif not (a.config and a.ckpt_path):
        p.error("give --config (one or more) with --ckpt_path, or --export")
    unknown = [o for o in overrides if not o.startswith("--")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return a, overrides


def main(argv: list[str] | None = None) -> int:
    a, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = os.path.abspath(a.out)
    # Gradio's uploads and served files go under the output folder, not a system temporary one
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(out, ".gradio")
    cast = cast_gallery(a.cast)
    log.info("loading the model from %s", a.export or a.ckpt_path)
    if a.export:
        engine = load_export_engine(a.export, resolution=a.resolution)
        load_engine = None
    else:
        engine = load_checkpoint_engine(a.config, a.ckpt_path, overrides)

        def load_engine(path: str):
            return load_checkpoint_engine(a.config, path, overrides)

    studio = Studio(engine, out)
    app = build_app(studio, cast=cast, load_engine=load_engine)
    log.info("mpp studio on http://%s:%d (output folder %s)", a.host, a.port, out)
    app.queue().launch(server_name=a.host, server_port=a.port, allowed_paths=[out], show_error=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
