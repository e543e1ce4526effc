"""The page of `mpp studio`: draw a shot's boxes on a frame, caption them, give them references from
the cast, generate, and keep the shot list (Gradio; the work is `mpp.studio.session.Studio`'s).

Every handler turns a bad input into a message in the page's status line (and a toast), never a
traceback: the studio's checks raise ValueError with what is wrong, and the page shows it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace

import gradio as gr
import numpy as np
from PIL import Image
from gradio_image_annotation import image_annotator

from mpp.evaluate import box_iou
from mpp.viz import BACKGROUND, FOREGROUND

from .session import Engine, Studio
from .shots import Shot, ShotBox, frame_presets

__all__ = ["build_app", "CUSTOM"]

log = logging.getLogger(__name__)

CUSTOM = "custom size"
CANVAS_HEIGHT = 420  # px on the page
DISPLAY = 640  # a frame smaller than this is shown at a whole multiple of its size (the toy's 128 px at 5×)
EMPTY_FRAME = 236  # the grey of an empty frame (boxes of either colour show on it)
BOX_COLUMNS = ["box", "caption", "reference", "role", "α"]
LIST_COLUMNS = ["#", "shot", "frame", "boxes", "prompt"]


def _rgb(colour) -> tuple[int, int, int]:
    return tuple(int(c) for c in colour)


def _frame_image(width: int, height: int, plate: str | None) -> np.ndarray:
    """An empty frame, or the plate scaled to cover the frame and centre-cropped to it."""
    if not plate:
        return np.full((height, width, 3), EMPTY_FRAME, np.uint8)
    with Image.open(plate) as im:
        im = im.convert("RGB")
        scale = max(width / im.width, height / im.height)
        im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.LANCZOS)
        x0, y0 = (im.width - width) // 2, (im.height - height) // 2
        return np.asarray(im.crop((x0, y0, x0 + width, y0 + height)))


def display_scale(width: int, height: int) -> int:
    """How many screen pixels a frame pixel takes on the canvas (the annotator never enlarges an image)."""
    return max(1, DISPLAY // max(width, height))


def _canvas(shot: Shot) -> dict:
    """The annotator's value for a shot: its frame (enlarged by `display_scale`) and boxes, coloured by role."""
    k = display_scale(shot.width, shot.height)
    image = _frame_image(shot.width, shot.height, shot.plate)
    if k > 1:
        image = np.repeat(np.repeat(image, k, axis=0), k, axis=1)
    return {"image": image,
            "boxes": [{"xmin": int(round(b.bbox[0] * k)), "ymin": int(round(b.bbox[1] * k)),
                       "xmax": int(round(b.bbox[2] * k)), "ymax": int(round(b.bbox[3] * k)), "label": b.caption,
                       "color": _rgb(FOREGROUND if b.reference else BACKGROUND)} for b in shot.boxes]}


def _boxes_from_canvas(canvas: dict | None, shot: Shot) -> list[ShotBox]:
    """The canvas's boxes in frame pixels, in the shot's order: the annotator lists the selected box
    first, so each drawn box is matched to the shot's box it overlaps most (IoU ≥ 0.3, greedily), keeps
    that box's place and reference, and new boxes come last."""
    k = display_scale(shot.width, shot.height)
    drawn = [([float(b[c]) / k for c in ("xmin", "ymin", "xmax", "ymax")], str(b.get("label", "")))
             for b in (canvas or {}).get("boxes") or []]
    pairs = sorted(((box_iou(d[0], old.bbox), i, j) for i, d in enumerate(drawn) for j, old in enumerate(shot.boxes)),
                   reverse=True)
    place: dict[int, int] = {}
    for iou, i, j in pairs:
        if iou >= 0.3 and i not in place and j not in place.values():
            place[i] = j
    kept = sorted((j, ShotBox(drawn[i][0], drawn[i][1], shot.boxes[j].reference)) for i, j in place.items())
    new = [ShotBox(bbox, caption) for i, (bbox, caption) in enumerate(drawn) if i not in place]
    return [b for _, b in kept] + new


def _box_rows(shot: Shot, alpha: list[float] | None = None) -> list[list]:
    return [[k + 1, b.caption, os.path.basename(b.reference) if b.reference else "", b.role,
             "" if alpha is None or k >= len(alpha) else f"{alpha[k]:.2f}"] for k, b in enumerate(shot.boxes)]


def _list_rows(shots: list[Shot]) -> list[list]:
    return [[k + 1, s.id, f"{s.width}×{s.height}", len(s.boxes), s.prompt[:60]] for k, s in enumerate(shots)]


def _ok(text: str) -> str:
    return f"**Done:** {text}"


def _bad(error: Exception) -> str:
    gr.Warning(str(error))
    return f"**Error:** {error}"


def _enlarged(image: np.ndarray, shot: Shot) -> np.ndarray:
    """A generated image as the page shows it: enlarged like the canvas (the files keep its size)."""
    k = display_scale(shot.width, shot.height)
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1) if k > 1 else image


def build_app(studio: Studio, *, cast: dict[str, list[str]] | None = None,
              load_engine: Callable[[str], Engine] | None = None) -> gr.Blocks:
    """The page over `studio`. `cast`: character → photos (`session.cast_gallery`); `load_engine`:
    loads another checkpoint from its path (shown as a field when given)."""
    cast = cast or {}
    presets = frame_presets(studio.engine.resolution, studio.engine.buckets)
    cast_items = [(photo, name) for name, photos in cast.items() for photo in photos]
    first = studio.new_shot("shot_001", width=next(iter(presets.values()))[0],
                            height=next(iter(presets.values()))[1])

    with gr.Blocks(title="mpp studio") as app:
        shot_state = gr.State(first)  # the shot being edited
        shots_state = gr.State([])  # the shot list
        gr.Markdown(f"## mpp studio\nModel: `{studio.engine.source}` · output folder: `{studio.out_dir}`",
                    elem_id="header")
        status = gr.Markdown("Draw boxes on the frame; give each a caption and, for a character or prop, a "
                             "reference.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    preset = gr.Dropdown([*presets, CUSTOM], value=next(iter(presets)), label="frame",
                                         elem_id="preset")
                    width = gr.Number(first.width, label="width (px)", precision=0, elem_id="width")
                    height = gr.Number(first.height, label="height (px)", precision=0, elem_id="height")
                with gr.Row():
                    plate = gr.Image(type="filepath", label="background plate or earlier generation (optional)",
                                     height=120, elem_id="plate")
                    new_frame = gr.Button("new frame", elem_id="new-frame")
                canvas = image_annotator(_canvas(first), label="boxes (draw, then type the caption)",
                                         image_type="numpy", sources=[], box_min_size=4, height=CANVAS_HEIGHT,
                                         show_clear_button=False, show_remove_button=False, elem_id="canvas")
                boxes_table = gr.Dataframe(_box_rows(first), headers=BOX_COLUMNS, interactive=False,
                                           label="boxes: red = foreground (has a reference), blue = background",
                                           elem_id="boxes")
                with gr.Row():
                    box_pick = gr.Number(1, label="box #", precision=0, minimum=1, elem_id="box-pick")
                    upload = gr.Image(type="filepath", label="reference image", height=120, elem_id="reference")
                    clear_ref = gr.Button("no reference", elem_id="clear-reference")
                gallery = gr.Gallery(cast_items, label="cast (click a photo to give it to box #)", columns=6,
                                     height=160, allow_preview=False, visible=bool(cast_items), elem_id="cast")
            with gr.Column(scale=2):
                shot_id = gr.Textbox(first.id, label="shot id", elem_id="shot-id")
                prompt = gr.Textbox("", label="prompt", lines=2, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(first.seed, label="seed", precision=0, minimum=0, elem_id="seed")
                    steps = gr.Number(first.steps, label="steps", precision=0, minimum=1, elem_id="steps")
                with gr.Row():
                    layout_g = gr.Number(first.layout_guidance, label="layout guidance", elem_id="layout-guidance")
                    identity_g = gr.Textbox("" if first.identity_guidance is None else str(first.identity_guidance),
                                            label="identity guidance", placeholder="empty: the layout guidance",
                                            elem_id="identity-guidance")
                variations = gr.Slider(0, 8, value=0, step=1, label="seed variations (0: none)",
                                       elem_id="variations")
                generate = gr.Button("generate", variant="primary", elem_id="generate")
                image = gr.Image(label="generated", interactive=False, format="png", elem_id="generated")
                overlay = gr.Image(label="boxes coloured by predicted α (red: identity, blue: layout only)",
                                   interactive=False, format="png", elem_id="overlay")
                strip = gr.Gallery(label="seed variations", columns=4, height=160, elem_id="strip")
        with gr.Accordion("shot list", open=True):
            list_table = gr.Dataframe([], headers=LIST_COLUMNS, interactive=False, elem_id="shot-list")
            with gr.Row():
                pick = gr.Number(1, label="shot #", precision=0, minimum=1, elem_id="shot-pick")
                add = gr.Button("add / update in list", elem_id="add-shot")
                open_shot = gr.Button("open #", elem_id="open-shot")
                duplicate = gr.Button("duplicate #", elem_id="duplicate-shot")
                up = gr.Button("move # up", elem_id="move-up")
                down = gr.Button("move # down", elem_id="move-down")
                remove = gr.Button("remove #", elem_id="remove-shot")
            with gr.Row():
                save = gr.Button("save shot list", variant="primary", elem_id="save-list")
                load_path = gr.Textbox(studio.shot_list_path, label="shot list to load (JSONL)", elem_id="load-path")
                load = gr.Button("load", elem_id="load-list")
        if load_engine is not None:
            with gr.Accordion("model", open=False):
                ckpt = gr.Textbox(studio.engine.source, label="checkpoint", elem_id="ckpt")
                load_ckpt = gr.Button("load checkpoint", elem_id="load-ckpt")

        fields = [shot_id, prompt, seed, steps, layout_g, identity_g]

        def current(shot: Shot, canvas_value, sid, text, sd, st, lg, ig) -> Shot:
            """The shot as the page shows it (the canvas gives the frame's boxes)."""
            try:
                values = dict(seed=int(sd), steps=int(st), layout_guidance=float(lg))
            except (TypeError, ValueError) as e:
                raise ValueError("seed, steps and layout guidance must be numbers") from e
            ig = str(ig or "").strip()
            try:
                values["identity_guidance"] = float(ig) if ig else None
            except ValueError as e:
                raise ValueError(f"identity guidance {ig!r}: give a number, or leave it empty for the layout "
                                 "guidance") from e
            return replace(shot, id=str(sid or "").strip(), prompt=str(text or ""),
                           boxes=_boxes_from_canvas(canvas_value, shot), **values)

        def editor(shot: Shot) -> list:
            ig = "" if shot.identity_guidance is None else str(shot.identity_guidance)
            return [shot, _canvas(shot), _box_rows(shot), shot.id, shot.prompt, shot.seed, shot.steps,
                    shot.layout_guidance, ig, shot.width, shot.height]

        editor_outputs = [shot_state, canvas, boxes_table, *fields, width, height]

        # in the browser, so that "new frame" clicked right after a preset already reads its size
        sizes = json.dumps({name: list(size) for name, size in presets.items()})
        preset.change(None, [preset, width, height], [width, height],
                      js=f"(name, w, h) => {{ const s = {sizes}[name]; return s ? s : [w, h]; }}")

        def on_new_frame(shot, canvas_value, w, h, plate_path, *values):
            try:
                w, h = int(w or 0), int(h or 0)
                shot = current(shot, canvas_value, *values)
                if w <= 0 or h <= 0 or w % 16 or h % 16:
                    raise ValueError(f"the frame {w}×{h} must be a positive multiple of 16 px on each side "
                                     "(VAE downsampling × 2×2 packing)")
                kept = [b for b in shot.boxes if b.bbox[2] <= w and b.bbox[3] <= h]
                shot = replace(shot, width=w, height=h, boxes=kept,
                                plate=studio.add_reference(plate_path) if plate_path else None)
                dropped = len(shot.boxes) - len(kept)
                note = f"; {dropped} boxes outside it removed" if dropped else ""
                return [*editor(shot), _ok(f"frame {w}×{h}{note}")]
            except (ValueError, OSError) as e:
                return [*[gr.update()] * len(editor_outputs), _bad(e)]

        new_frame.click(on_new_frame, [shot_state, canvas, width, height, plate, *fields], [*editor_outputs, status])

        def on_canvas(shot, canvas_value):
            shot = replace(shot, boxes=_boxes_from_canvas(canvas_value, shot))
            return shot, _box_rows(shot)

        canvas.change(on_canvas, [shot_state, canvas], [shot_state, boxes_table])

        def set_reference(shot, canvas_value, k, path):
            try:
                shot = replace(shot, boxes=_boxes_from_canvas(canvas_value, shot))
                k = int(k or 0)
                if not 1 <= k <= len(shot.boxes):
                    raise ValueError(f"box #{k}: the frame has {len(shot.boxes)} boxes; draw one first"
                                     if not shot.boxes else f"box #{k}: give 1 to {len(shot.boxes)}")
                boxes = copy.deepcopy(shot.boxes)
                boxes[k - 1].reference = studio.add_reference(path) if path else None
                shot = replace(shot, boxes=boxes)
                what = f"reference {os.path.basename(boxes[k - 1].reference)}" if path else "no reference"
                return shot, _canvas(shot), _box_rows(shot), _ok(f"box {k}: {what}")
            except (ValueError, OSError) as e:
                return gr.update(), gr.update(), gr.update(), _bad(e)

        upload.upload(set_reference, [shot_state, canvas, box_pick, upload], [shot_state, canvas, boxes_table, status])
        clear_ref.click(lambda s, c, k: set_reference(s, c, k, None), [shot_state, canvas, box_pick],
                        [shot_state, canvas, boxes_table, status])

        def pick_cast(shot, canvas_value, k, event: gr.SelectData):
            return set_reference(shot, canvas_value, k, cast_items[event.index][0])

        gallery.select(pick_cast, [shot_state, canvas, box_pick], [shot_state, canvas, boxes_table, status])

        def on_generate(shot, canvas_value, count, *values, progress=gr.Progress()):  # noqa: B008 (Gradio's way)
            try:
                shot = current(shot, canvas_value, *values)
                progress(0, desc=f"generating {shot.id}")
                result = studio.render(shot)
                strip_images = []
                if int(count or 0) > 0:
                    progress(0.5, desc=f"{int(count)} seed variations")
                    strip_images = [(_enlarged(r.image, shot), f"seed {r.record['seed']}")
                                    for r in studio.seed_strip(shot, int(count))]
                alphas = ", ".join(f"{a:.2f}" for a in result.alpha)
                return (shot, _enlarged(result.image, shot), _enlarged(result.overlay, shot), strip_images,
                        _box_rows(shot, result.alpha),
                        _ok(f"{shot.id}: {result.record['image']} (seed {result.record['seed']}, α {alphas})"))
            except (ValueError, OSError) as e:
                return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), _bad(e)

        generate.click(on_generate, [shot_state, canvas, variations, *fields],
                       [shot_state, image, overlay, strip, boxes_table, status])

        def on_add(shot, shots, canvas_value, *values):
            try:
                shot = current(shot, canvas_value, *values)
                studio.check(shot)
                shots = list(shots)
                at = next((k for k, s in enumerate(shots) if s.id == shot.id), None)
                if at is None:
                    shots.append(copy.deepcopy(shot))
                else:
                    shots[at] = copy.deepcopy(shot)
                return shot, shots, _list_rows(shots), _ok(f"{shot.id} {'updated' if at is not None else 'added'}")
            except ValueError as e:
                return gr.update(), gr.update(), gr.update(), _bad(e)

        add.click(on_add, [shot_state, shots_state, canvas, *fields], [shot_state, shots_state, list_table, status])

        def _index(shots, k) -> int:
            k = int(k or 0)
            if not 1 <= k <= len(shots):
                raise ValueError(f"shot #{k}: the list has {len(shots)} shots")
            return k - 1

        def on_open(shots, k):
            try:
                shot = copy.deepcopy(shots[_index(shots, k)])
                return [*editor(shot), _ok(f"opened {shot.id}")]
            except ValueError as e:
                return [*[gr.update()] * len(editor_outputs), _bad(e)]

        open_shot.click(on_open, [shots_state, pick], [*editor_outputs, status])

        def on_duplicate(shots, k):
            try:
                i = _index(shots, k)
                ids = {s.id for s in shots}
                n = 2
                while f"{shots[i].id}_{n}" in ids:
                    n += 1
                shots = [*shots[: i + 1], replace(copy.deepcopy(shots[i]), id=f"{shots[i].id}_{n}"), *shots[i + 1 :]]
                return shots, _list_rows(shots), _ok(f"duplicated as {shots[i + 1].id}")
            except ValueError as e:
                return gr.update(), gr.update(), _bad(e)

        duplicate.click(on_duplicate, [shots_state, pick], [shots_state, list_table, status])

        def mover(step: int):
            def move(shots, k):
                try:
                    i = _index(shots, k)
                    j = min(max(i + step, 0), len(shots) - 1)
                    shots = list(shots)
                    shots[i], shots[j] = shots[j], shots[i]
                    return shots, _list_rows(shots), j + 1, _ok(f"{shots[j].id} is #{j + 1}")
                except ValueError as e:
                    return gr.update(), gr.update(), gr.update(), _bad(e)
            return move

        up.click(mover(-1), [shots_state, pick], [shots_state, list_table, pick, status])
        down.click(mover(1), [shots_state, pick], [shots_state, list_table, pick, status])

        def on_remove(shots, k):
            try:
                i = _index(shots, k)
                gone = shots[i].id
                shots = [*shots[:i], *shots[i + 1 :]]
                return shots, _list_rows(shots), _ok(f"removed {gone}")
            except ValueError as e:
                return gr.update(), gr.update(), _bad(e)

        remove.click(on_remove, [shots_state, pick], [shots_state, list_table, status])

        def on_save(shots):
            try:
                if not shots:
                    raise ValueError("the shot list is empty: add the shot first")
                path = studio.save(shots)
                return _ok(f"saved {len(shots)} shots to {path} (render them all with `mpp generate --layouts {path}`)")
            except ValueError as e:
                return _bad(e)

        save.click(on_save, shots_state, status)

        def on_load(path):
            try:
                shots, errors = studio.load(str(path or "").strip() or None)
                note = f"; {len(errors)} bad lines skipped: {errors[0]}" if errors else ""
                return shots, _list_rows(shots), _ok(f"loaded {len(shots)} shots{note}")
            except (ValueError, OSError) as e:
                return gr.update(), gr.update(), _bad(e)

        load.click(on_load, load_path, [shots_state, list_table, status])

        if load_engine is not None:
            def on_load_ckpt(path):
                try:
                    studio.engine = load_engine(str(path).strip())
                    return _ok(f"loaded {studio.engine.source}")
                except (ValueError, OSError) as e:
                    return _bad(e)

            load_ckpt.click(on_load_ckpt, ckpt, status)
    return app
