"""`mpp synth PROMPTS RAW`: a FLUX pipeline renders a prompt list into frames, which `mpp annotate`'s
steps then label into the raw layout (DESIGN.md section 2; the guide's prepare_synthetic_dataset.py).

    mpp synth prompts.txt /data/raw --model black-forest-labs/FLUX.1-dev --width 1360 --height 768 \\
        [--steps 28] [--guidance 3.5] [--seed 0] [--device cuda] [--dtype bfloat16] \\
        [--num_shards K --shard_index I] [-- --detector owlv2 --cast CAST ...]
    mpp synth "a {red|blue} car in a {street|field}" /data/raw --count 100    # a template, 100 draws
    mpp synth prompts.jsonl /data/raw --toy .cache/toy/models                  # the toy world's backbone

PROMPTS is one of:
- a .txt file: one prompt a line (blank lines and lines starting with '#' skipped); each line may
  hold alternatives, `{a|b|c}` (an empty one, `{|big }`, makes a word optional), and stands for
  every combination of them, in order;
- a .jsonl file: one object a line, `{"prompt": ..., "id"?: ..., "seed"?: ..., "width"?: ...,
  "height"?: ...}`, taken literally;
- anything else: a prompt or template given inline.
`--count N` draws N prompts at random (seeded by --seed) from the combinations of a .txt file or
template instead of taking each once; with a plain prompt it renders N seeds of it. Sample i
(0-based, in that order) is `<RAW>/synth/frames/<id>.png`, its id the JSONL's or i as six digits,
rendered from seed --seed + i unless its JSONL line gives one.

Each frame gets a line in `<RAW>/synth/synth.jsonl` (id, prompt, seed, width, height, steps,
guidance, model) once its image is written. A rerun skips every sample whose image exists, and
refuses one whose recorded prompt or settings differ from what this run asks for, naming it. With
`--num_shards K --shard_index I` a process renders samples i ≡ I (mod K); K processes together write
what one would. Then the frames are labelled by `mpp annotate` with the prompt as each frame's scene
caption and the flags given after `--`; with several shards (or `--no_label`) labelling is left to a
final `mpp synth PROMPTS RAW --label_only -- FLAGS`, once every shard is done.

`--model` is any FLUX checkpoint diffusers' `FluxPipeline` loads (hub id or folder). `--toy DIR`
renders with the toy bundle's backbone, encoders and patch codec through mpp's own sampler
(`mpp.sampling`, no instances) instead: FluxPipeline cannot load the codec.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from diffusers import FluxPipeline, FluxTransformer2DModel
from tqdm import tqdm

from mpp.data.buckets import UNIT
from mpp.encoders import EncoderSettings, Encoders, embedding_dims, parse_dtype
from mpp.filenames import is_safe_stem
from mpp.layouts import Layout
from mpp.nn import DEFAULT_GUIDANCE, HeadsConfig, MppFlux, explain_missing
from mpp.sampling import SamplingConfig, generate_one

log = logging.getLogger(__name__)

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
SYNTH_DIR, FRAMES_DIR, RECORDS_NAME = "synth", "frames", "synth.jsonl"
RECORD_KEYS = ("id", "prompt", "seed", "width", "height", "steps", "guidance", "model")
MAX_COMBINATIONS = 1_000_000  # a template expanding to more needs --count
_TEMPLATE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    seed: int
    width: int
    height: int


# ------------------------------------------------------------------------------------- prompts


def check_size(value, flag: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % UNIT:
        raise ValueError(f"{flag} must be a positive multiple of {UNIT} px (VAE downsampling × 2×2 packing), "
                         f"got {value!r}")
    return value


def parse_template(text: str, where: str) -> list[list[str]]:
    """`text` as a list of slots, each the list of its alternatives (a literal run: one)."""
    parts, end = [], 0
    for m in _TEMPLATE.finditer(text):
        parts += [[text[end:m.start()]], m.group(1).split("|")]
        end = m.end()
    parts.append([text[end:]])
    stray = next((c for p in parts if len(p) == 1 for c in "{}" if c in p[0]), None)
    if stray:
        raise ValueError(f"{where}: unbalanced {stray!r} in {text!r} (alternatives are written {{a|b|c}}, not nested)")
    return parts


def _joined(words: tuple[str, ...] | list[str]) -> str:
    return " ".join("".join(words).split())  # an empty alternative leaves no double space


def _combinations(parts: list[list[str]]) -> int:
    return math.prod(len(p) for p in parts)


def _read_txt(path: str) -> list[tuple[str, list[list[str]]]]:
    lines = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                where = f"{path}:{number}"
                lines.append((where, parse_template(text, where)))
    if not lines:
        raise ValueError(f"{path}: no prompts (one a line; blank lines and '#' comments are skipped)")
    return lines


def _expand(templates: list[tuple[str, list[list[str]]]], count: int | None, seed: int) -> list[str]:
    """Every combination of every line in order, or `count` draws (a line, then each slot, uniformly)."""
    if count is not None:
        rng = random.Random(seed)
        return [_joined([rng.choice(p) for p in rng.choice(templates)[1]]) for _ in range(count)]
    total = sum(_combinations(parts) for _, parts in templates)
    if total > MAX_COMBINATIONS:
        raise ValueError(f"the prompts expand to {total} combinations (more than {MAX_COMBINATIONS}): "
                         "draw some with --count N")
    return [_joined(words) for _, parts in templates for words in itertools.product(*parts)]


def _int_field(data: dict, key: str, where: str, default: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} must be a whole number, got {value!r}")
    return value


def _read_jsonl(path: str, *, seed: int, width: int, height: int) -> list[Sample]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from e
            if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
                raise ValueError(f"{where}: needs a non-empty string field 'prompt'")
            i = len(samples)
            sid = data.get("id", f"{i:06d}")
            if not isinstance(sid, str | int) or isinstance(sid, bool) or not is_safe_stem(str(sid)):
                raise ValueError(f"{where}: id {sid!r} is not a plain file name (letters, digits, '.', '_', '-')")
            samples.append(Sample(str(sid), data["prompt"].strip(), _int_field(data, "seed", where, seed + i),
                                  check_size(_int_field(data, "width", where, width), f"{where}: 'width'"),
                                  check_size(_int_field(data, "height", where, height), f"{where}: 'height'")))
    if not samples:
        raise ValueError(f"{path}: no prompts (one JSON object a line with a 'prompt')")
    return samples


def read_prompts(source: str, *, count: int | None = None, seed: int = 0, width: int = 1024,
                 height: int = 1024) -> list[Sample]:
    """The samples PROMPTS stands for (see the module docstring), in order; ids unique."""
    if os.path.isfile(source) and source.endswith(".jsonl"):
        if count is not None:
            raise ValueError(f"--count draws from a .txt file or a template; {source} lists its samples itself")
        samples = _read_jsonl(source, seed=seed, width=width, height=height)
    else:
        if os.path.isfile(source):
            templates = _read_txt(source)
        elif source.endswith((".txt", ".jsonl", ".json")) or os.sep in source:
            raise ValueError(f"PROMPTS: no such file {source!r} (a .txt or .jsonl file, or a prompt given inline)")
        elif not source.strip():
            raise ValueError("PROMPTS: an empty prompt")
        else:
            templates = [("PROMPTS", parse_template(source.strip(), "PROMPTS"))]
        prompts = _expand(templates, count, seed)
        samples = [Sample(f"{i:06d}", p, seed + i, width, height) for i, p in enumerate(prompts)]
    first: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.id.lower() in first:
            raise ValueError(f"{source}: sample {i + 1} repeats the id {s.id!r} of sample {first[s.id.lower()] + 1}")
        first[s.id.lower()] = i
    return samples


# ------------------------------------------------------------------------------------ renderers


@dataclass(frozen=True)
class RenderSettings:
    steps: int = 28
    guidance: float = DEFAULT_GUIDANCE
    device: str = "cpu"
    dtype: str = "float32"
    max_sequence_length: int = 512

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"--guidance must be a finite number >= 0, got {self.guidance}")
        if self.max_sequence_length < 1:
            raise ValueError(f"--max_sequence_length must be >= 1, got {self.max_sequence_length}")
        parse_dtype(self.dtype, "--dtype")


class Renderer(Protocol):
    def render(self, sample: Sample) -> np.ndarray:
        """The sample's H×W×3 uint8 image, a pure function of the sample and the renderer's settings."""


class FluxRenderer:
    """diffusers' `FluxPipeline` from any FLUX checkpoint (hub id or folder), one image a call."""

    def __init__(self, model: str, settings: RenderSettings, flag: str = "model"):
        self.settings = settings
        with explain_missing(flag, model, "a FLUX pipeline (model_index.json and its component folders)"):
            self.pipe = FluxPipeline.from_pretrained(model, torch_dtype=parse_dtype(settings.dtype))
        self.pipe.to(settings.device)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def render(self, sample: Sample) -> np.ndarray:
        s = self.settings
        out = self.pipe(prompt=sample.prompt, width=sample.width, height=sample.height, num_inference_steps=s.steps,
                        guidance_scale=s.guidance, max_sequence_length=s.max_sequence_length, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(sample.seed))  # the same noise on any device
        return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)


class SamplerRenderer:
    """mpp's own Euler sampler (`mpp.sampling.generate_one`) over a FLUX-layout bundle with an empty
    instance list: the backbone alone, with whatever VAE `mpp.encoders` loads (the toy's codec too)."""

    def __init__(self, encoders: EncoderSettings, backbone: str, settings: RenderSettings, flag: str = "model"):
        self.settings = settings
        dtype = parse_dtype(settings.dtype)
        self.encoders = Encoders(encoders, dtype=dtype, device=settings.device)
        with explain_missing(flag, backbone, "the FLUX transformer (transformer/)"):
            transformer = FluxTransformer2DModel.from_pretrained(backbone, subfolder="transformer", torch_dtype=dtype)
        dims = embedding_dims(encoders)
        self.model = MppFlux(transformer, clip_dim=dims["clip_dim"], dino_dim=dims["dino_dim"],
                             text_dim=dims["text_dim"], heads=HeadsConfig(lora_rank=0))
        self.model.to(device=settings.device, dtype=dtype).eval()

    def render(self, sample: Sample) -> np.ndarray:
        layout = Layout(id=sample.id, prompt=sample.prompt, boxes=torch.zeros(0, 4), captions=[], references=[],
                        name=sample.id, width=sample.width, height=sample.height)
        sampling = SamplingConfig(steps=self.settings.steps, seed=sample.seed)
        pixels, _, _ = generate_one(self.model, self.encoders, layout, sampling=sampling, index=0,
                                    guidance=self.settings.guidance)
        return pixels


# ------------------------------------------------------------------------------------ the run


def synth_paths(raw: str) -> tuple[str, str]:
    """(frames folder, records JSONL) of a raw folder."""
    root = os.path.join(raw, SYNTH_DIR)
    return os.path.join(root, FRAMES_DIR), os.path.join(root, RECORDS_NAME)


def read_records(path: str) -> dict[str, tuple[str, dict]]:
    """id → (where, record) of the records JSONL; an unreadable line (a run killed mid-write) is
    logged and ignored: its image, if any, gets a new line."""
    records: dict[str, tuple[str, dict]] = {}
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records.setdefault(str(record["id"]), (f"{path}:{number}", record))
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s:%d: not a record, ignored", path, number)
    return records


def _append_record(path: str, record: dict) -> None:
    """One line, one write (appends of whole lines from several shards do not interleave)."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        newline = b""
        if f.tell():
            f.seek(-1, os.SEEK_END)
            newline = b"" if f.read(1) == b"\n" else b"\n"  # after a line cut short by a kill
        f.write(newline + (json.dumps(record) + "\n").encode("utf-8"))


def _check_record(where: str, old: dict, new: dict) -> None:
    diff = [k for k in RECORD_KEYS if old.get(k) != new[k]]
    if diff:
        was = ", ".join(f"{k}={old.get(k)!r}" for k in diff)
        now = ", ".join(f"{k}={new[k]!r}" for k in diff)
        raise ValueError(f"{where}: sample {new['id']!r} was rendered with {was}; this run asks for {now}. "
                         f"Use another RAW folder, or delete {new['id']}.png and its line to render it again")


def _save_png(image: np.ndarray, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)  # a killed run never leaves a truncated frame that a rerun would skip


@dataclass
class SynthResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def shard(samples: list[Sample], num_shards: int, shard_index: int) -> list[Sample]:
    if num_shards < 1:
        raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index must lie in [0, --num_shards={num_shards}), got {shard_index}")
    return samples[shard_index::num_shards]


def synthesize(samples: list[Sample], raw: str, make_renderer: Callable[[], Renderer], *, model: str,
               settings: RenderSettings, num_shards: int = 1, shard_index: int = 0,
               progress: bool = True) -> SynthResult:
    """Renders this shard's samples into `<raw>/synth/frames/` and records them in synth.jsonl; the
    renderer is made only when a sample is left to render."""
    mine = shard(samples, num_shards, shard_index)
    frames, records_path = synth_paths(raw)
    os.makedirs(frames, exist_ok=True)
    recorded = read_records(records_path)
    result, renderer = SynthResult(), None
    bar = tqdm(total=len(mine), desc="synth", unit="image", disable=not progress, mininterval=1.0)
    try:
        for sample in mine:
            record = {"id": sample.id, "prompt": sample.prompt, "seed": sample.seed, "width": sample.width,
                      "height": sample.height, "steps": settings.steps, "guidance": settings.guidance, "model": model}
            if sample.id in recorded:
                _check_record(*recorded[sample.id], record)
            image_path = os.path.join(frames, f"{sample.id}.png")
            if os.path.exists(image_path):
                result.skipped.append(sample.id)
            else:
                if renderer is None:
                    bar.set_postfix_str("loading the model")
                    renderer = make_renderer()
                    bar.set_postfix_str("")
                _save_png(renderer.render(sample), image_path)
                result.written.append(sample.id)
            if sample.id not in recorded:
                _append_record(records_path, record)
            bar.update()
    finally:
        bar.close()
    return result


def label(raw: str, flags: list[str]) -> int:
    """`mpp annotate` over the synthetic frames, their prompts as scene captions, with `flags`."""
    frames, records = synth_paths(raw)
    try:
        annotate = importlib.import_module("mpp.annotate.__main__")  # a tool, reached as mpp/__main__ reaches it
    except ModuleNotFoundError as e:
        raise ValueError(f"mpp annotate is not available ({e}): render with --no_label, label later") from e
    # independent renders are never near-duplicate footage frames: no dropping unless `flags` asks
    return annotate.main([frames, raw, "--scene_captions", records, "--dup_threshold", "0", *flags])


# ------------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpp synth", description="Renders prompts with a FLUX pipeline into "
                                "RAW/synth/frames, then labels the frames with mpp annotate (flags after --).",
                                usage="mpp synth PROMPTS RAW [options] [-- annotate options]")
    p.add_argument("prompts", metavar="PROMPTS", help="a .txt or .jsonl file of prompts, or a prompt/template")
    p.add_argument("raw", metavar="RAW", help="the raw folder to write (frames go to RAW/synth/frames)")
    p.add_argument("--model", help=f"FLUX checkpoint, hub id or folder (default {DEFAULT_MODEL})")
    p.add_argument("--toy", metavar="MODELS_DIR", help="render with the toy bundle through mpp's sampler")
    p.add_argument("--count", type=int, help="draw N prompts from a .txt file or template (seeded by --seed)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="FLUX-dev's guidance embedding")
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i gets seed + i")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bfloat16 on cuda)")
    p.add_argument("--max_sequence_length", type=int, default=512, help="T5 prompt tokens")
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--shard_index", type=int, default=0)
    p.add_argument("--no_label", action="store_true", help="render only")
    p.add_argument("--label_only", action="store_true", help="label the frames rendered so far, render nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _toy_renderer(models_dir: str, settings: RenderSettings) -> Renderer:
    # the toy world is a leaf that imports the core: reached by name, as mpp/__main__ reaches each tool
    return importlib.import_module("mpp.toy.synth").toy_renderer(models_dir, settings)


def _model_name(path: str) -> str:
    return os.path.abspath(path) if os.path.isdir(path) else path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    annotate_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    a = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.toy and a.model:
        raise ValueError("--toy and --model: give one (--toy renders with the toy bundle, --model with FLUX)")
    if a.count is not None and a.count < 1:
        raise ValueError(f"--count must be >= 1, got {a.count}")
    if a.no_label and a.label_only:
        raise ValueError("--no_label and --label_only: give at most one")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = RenderSettings(steps=a.steps, guidance=a.guidance, device=device,
                              dtype=a.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
                              max_sequence_length=a.max_sequence_length)
    samples = read_prompts(a.prompts, count=a.count, seed=a.seed, width=check_size(a.width, "--width"),
                           height=check_size(a.height, "--height"))
    shard(samples, a.num_shards, a.shard_index)  # checks the shard flags before anything is written
    if not a.label_only:
        if a.toy:
            model, make = f"toy:{_model_name(a.toy)}", (lambda: _toy_renderer(a.toy, settings))
        else:
            path = a.model or DEFAULT_MODEL
            model, make = _model_name(path), (lambda: FluxRenderer(path, settings))
        result = synthesize(samples, a.raw, make, model=model, settings=settings, num_shards=a.num_shards,
                            shard_index=a.shard_index, progress=not a.quiet)
        log.info("rendered %d frames, %d already there, in %s", len(result.written), len(result.skipped),
                 synth_paths(a.raw)[0])
    if a.no_label:
        return 0
    if a.num_shards > 1 and not a.label_only:
        log.info("shard %d of %d done; once every shard is, label the frames with: mpp synth %s %s --label_only "
                 "-- %s", a.shard_index, a.num_shards, a.prompts, a.raw, " ".join(annotate_flags))
        return 0
    return label(a.raw, annotate_flags)


if __name__ == "__main__":
    raise SystemExit(main())
