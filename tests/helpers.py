"""Everything the tests share but fixtures (those are in the conftest files): test-only callbacks
(referenced by class path from tests/conf/*.yaml), the CLI arguments of a toy run, random model
inputs for the toy bundle and for the tiny FLUX config of tests/conf/tiny_flux.json."""

import importlib.util
import json
import os
from pathlib import Path

import lightning as L
import torch

from mpp.data.buckets import Buckets
from mpp.nn import MppFlux, flux_velocity
from mpp.toy.bundle import toy_encoder_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_SIZE = 128  # the side of the toy world's images in the tests
WIDE_RATIOS = [1.0, 16 / 9, 2.39]  # the widescreen toy world's frames (tests' toy_wide_* fixtures)
WIDE_BUCKETS = Buckets(aspect_ratios=WIDE_RATIOS, portrait=False)  # at TOY_SIZE: 128×128, 176×96, 192×80

BOXES = [[0.1, 0.1, 0.6, 0.5], [0.4, 0.3, 0.9, 0.9], [0.0, 0.0, 0.3, 0.3]]


def toy_conditioning(b: int, n: int, generator: torch.Generator, *, txt_len: int = 32, width: int = 32,
                     dino_width: int = 64) -> dict:
    """Random MppFlux conditioning for the toy bundle (text and CLIP widths 32, DINOv2 64), n ≤ 3 fixed boxes."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {"prompt_embeds": randn(b, txt_len, width), "pooled_prompt_embeds": randn(b, width),
            "boxes": torch.tensor(BOXES[:n]).expand(b, n, 4), "instance_mask": torch.ones(b, n, dtype=torch.bool),
            "instance_text": randn(b, n, width), "clip_embeds": randn(b, n, width),
            "dino_embeds": randn(b, n, dino_width)}


class PoisonBeforeValidation(L.Callback):
    """Writes NaN into one trainable weight as the first real validation starts: every training step
    before it was finite, and the model that validation sees has diverged."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with torch.no_grad():
            next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


class Recorder(L.Callback):
    """Records each training batch's loss and sample ids; writes them per rank at the end."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.losses: list[float] = []
        self.ids: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ids.extend(batch["ids"])

    def on_train_end(self, trainer, pl_module):
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump({"losses": self.losses, "ids": self.ids, "steps": trainer.global_step,
                           "bad": sorted(getattr(trainer.datamodule, "bad_records", {}))}, f)


class SignalAt(L.Callback):
    """Sends `signum` as training batch number `batch` (counted in this run) starts, as a scheduler
    would: to this process, or with `group` to its whole process group (DataLoader workers included);
    with `rank`, only that rank sends it."""

    def __init__(self, batch: int = 5, signum: int = 15, group: bool = False, rank: int | None = None):
        self.batch, self.signum, self.group, self.rank, self.seen = batch, signum, group, rank, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1
        if self.seen == self.batch and self.rank in (None, trainer.global_rank):
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


class RankRecorder(Recorder):
    """A Recorder writing to $MPP_RECORD_DIR (set by a test that launches processes)."""

    def __init__(self):
        super().__init__(out_dir=os.environ["MPP_RECORD_DIR"])


class PoisonGradient(L.Callback):
    """Makes the gradients of training micro-batch number `batch` (1-based, counted in this run) NaN
    after its backward, as an overflow would."""

    def __init__(self, batch: int = 3):
        self.batch, self.seen = batch, 0

    def on_after_backward(self, trainer, pl_module):
        self.seen += 1
        if self.seen == self.batch:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    return


def fit_args(stage, toy_models, toy_prepared, *extra, overlays=("tests/conf/fast.yaml",)):
    enc = toy_encoder_settings(toy_models)
    configs = [f"configs/stage{stage}.yaml", "configs/toy.yaml", *overlays]
    return ["fit", *[a for c in configs for a in ("--config", os.path.join(ROOT, c))],
            f"--model.backbone={toy_models}", f"--data.root={toy_prepared}", f"--data.encoders.flux={enc.flux}",
            f"--data.encoders.clip_vision={enc.clip_vision}", f"--data.encoders.dino={enc.dino}", *extra]


def recorder(cli) -> Recorder:
    return next(c for c in cli.trainer.callbacks if isinstance(c, Recorder))


# ---- the tiny FLUX config of the mpp.nn tests

CONF = Path(ROOT) / "tests" / "conf" / "tiny_flux.json"
DIMS = {"clip_dim": 12, "dino_dim": 10, "text_dim": 8}
LORA_RANK = 4
TXT_LEN = 6


def load_tiny_config() -> dict:
    return json.loads(CONF.read_text())


def random_boxes(gen: torch.Generator, b: int, n: int) -> torch.Tensor:
    """Random xyxy boxes in [0, 1]; some touch the border, some are tiny."""
    a = torch.rand(b, n, 2, generator=gen)
    c = torch.rand(b, n, 2, generator=gen)
    boxes = torch.cat([torch.minimum(a, c), torch.maximum(a, c)], dim=-1)
    if n > 1:
        boxes[:, 0] = torch.tensor([0.0, 0.0, 0.6, 1.0])  # touches three borders
    if n > 2:
        boxes[:, 1] = torch.tensor([0.4, 0.3, 1.0, 0.8])  # overlaps box 0, right border
    if n > 3:
        c0 = torch.rand(b, 2, generator=gen) * 0.9
        boxes[:, 3] = torch.cat([c0, c0 + 0.01], dim=-1)  # smaller than a token
    return boxes


def plain_forward(backbone, inputs: dict) -> torch.Tensor:
    """The plain backbone (diffusers' own forward) on `make_inputs`' inputs, B×C×h×w."""
    return flux_velocity(backbone, inputs["latents"], inputs["timesteps"], inputs["prompt_embeds"],
                         inputs["pooled_prompt_embeds"], guidance=float(inputs["guidance"][0]))


def make_inputs(seed: int = 0, b: int = 2, n: int = 3, h: int = 12, w: int = 16, mask=None, boxes=None) -> dict:
    """Random MppFlux.forward keyword arguments for the tiny config (64 in-channels → 16 latent channels)."""
    gen = torch.Generator().manual_seed(seed)
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool)
        if n > 1:
            mask[0, -1] = False  # one padding slot in the first sample
    if boxes is None:
        boxes = random_boxes(gen, b, n)
    return {
        "latents": torch.randn(b, 16, h, w, generator=gen),
        "timesteps": torch.rand(b, generator=gen),
        "prompt_embeds": torch.randn(b, TXT_LEN, 32, generator=gen),
        "pooled_prompt_embeds": torch.randn(b, 32, generator=gen),
        "boxes": boxes,
        "instance_mask": mask,
        "instance_text": torch.randn(b, n, DIMS["text_dim"], generator=gen),
        "clip_embeds": torch.randn(b, n, DIMS["clip_dim"], generator=gen),
        "dino_embeds": torch.randn(b, n, DIMS["dino_dim"], generator=gen),
        "guidance": torch.full((b,), 3.5),
    }


@torch.no_grad()
def randomize(model: MppFlux, groups=("layout", "modulation", "feedback", "lora"), scale: float = 0.3, seed: int = 1):
    """Give the zero-initialized projections (and LoRA B) random values so the heads do something."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    if "layout" in groups:
        params += list(model.layout_proj.parameters())
    if "modulation" in groups:
        params += list(model.modulation.up.parameters())
    if "feedback" in groups:
        params += list(model.feedback.parameters())
    if "lora" in groups:
        params += [p for n, p in model.backbone.named_parameters() if ".lora_B." in n]
    for p in params:
        p.copy_(torch.randn(p.shape, generator=gen) * scale)


def load_bench(name: str):
    """The module of bench/<name>.py (the benches are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
