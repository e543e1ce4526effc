"""Everything the tests share but fixtures (those are in the conftest files): test-only callbacks
(referenced by class path from tests/conf/*.yaml), the CLI arguments of a toy run, random model
inputs for the toy bundle and for the tiny FLUX config of tests/conf/tiny_flux.json."""

import importlib.util
import json
import os
from pathlib import Path

import lightning as L
import torch
from PIL import Image

from mpp.cli import main as cli_main
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


def train_toy_checkpoint(root, toy_models, toy_prepared, *extra, steps: int = 2) -> tuple[str, list[str]]:
    """A stage-1 toy run of `steps` steps in folder `root`: its last checkpoint and the fit arguments."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        args = fit_args(1, toy_models, toy_prepared, f"--trainer.max_steps={steps}", *extra)
        cli_main(args)
    finally:
        os.chdir(cwd)
    return os.path.join(str(root), f"runs/checkpoints/stage1/step={steps:07d}.ckpt"), args


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


# ---- tiny random open-vocabulary detectors and CLIP, with tokenizers built offline

def tiny_bert_tokenizer():
    """A BERT WordPiece tokenizer over single characters (lower-case letters, digits, punctuation), so
    any English phrase tokenizes without [UNK]."""
    import string

    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *chars, *(f"##{c}" for c in chars)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIP byte-level BPE tokenizer without merges (one token a character; specials last, so that
    OWLv2's "first token > 0" query mask holds)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [*alphabet, *(f"{c}</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=max_length)


def _tiny_clip_text_config(tokenizer, max_length: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def save_tiny_grounding_dino(folder, seed: int = 0) -> str:
    """A random tiny GroundingDinoForObjectDetection (about 160k parameters) and its processor, saved to `folder`."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_bert_tokenizer()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=128),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=30, max_text_len=64,
        encoder_n_points=2, decoder_n_points=2)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 144})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def save_tiny_owlv2(folder, seed: int = 0) -> str:
    """A random tiny Owlv2ForObjectDetection (64×64 input, 16 boxes) and its processor, saved to `folder`."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(16)
    config = Owlv2Config(text_config=_tiny_clip_text_config(tokenizer, 16), projection_dim=16,
                         vision_config=dict(hidden_size=16, image_size=64, patch_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def save_tiny_clip(folder, seed: int = 0) -> str:
    """A random tiny CLIPModel (32×32 images) and its processor, saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(77)
    config = CLIPConfig(text_config=_tiny_clip_text_config(tokenizer, 77), projection_dim=16,
                        vision_config=dict(hidden_size=16, image_size=32, patch_size=8, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32))
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


# ---- tiny random captioners and a tiny FLUX pipeline (tests/test_caption.py, tests/test_synth.py)

def tiny_word_tokenizer(words, specials, *, max_length: int = 32, template: str | None = None, **special_tokens):
    """A word-level `PreTrainedTokenizerFast` over `specials` + `words` (in that order, so specials
    have the first ids), lower-cased and split at spaces and punctuation; `template` (e.g.
    "[CLS] $A [SEP]") adds special tokens around each text."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words]))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=special_tokens.get("unk_token", specials[0])))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if template:
        used = [t for t in template.split() if t in vocab]
        specials_used = [(t, vocab[t]) for t in used]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials_used)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **special_tokens)


CAPTION_WORDS = "a an the red blue green square circle man woman car street field on in of left right".split()


def save_tiny_blip(folder, seed: int = 0) -> str:
    """A random tiny BlipForConditionalGeneration (32×32 input) and its processor, saved to `folder`."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = tiny_word_tokenizer(CAPTION_WORDS, ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[DEC]"],
                                    template="[CLS] $A [SEP]", unk_token="[UNK]", pad_token="[PAD]",
                                    cls_token="[CLS]", sep_token="[SEP]", bos_token="[DEC]")
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in (("pad", "[PAD]"), ("sep", "[SEP]"), ("bos", "[DEC]"))}
    config = BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=16,
                         bos_token_id=ids["bos"], pad_token_id=ids["pad"], sep_token_id=ids["sep"],
                         eos_token_id=ids["sep"]),
        projection_dim=16)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return str(folder)


def save_tiny_florence2(folder, seed: int = 0) -> str:
    """A random tiny Florence2ForConditionalGeneration (32×32 input: 4×4 + 1 image tokens, Florence's
    1000 location tokens) and its processor, saved to `folder`."""
    from transformers import (
        BartConfig,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    task_words = "what does the image describe region ? .".split()
    tokenizer = tiny_word_tokenizer(task_words + CAPTION_WORDS, ["<s>", "<pad>", "</s>", "<unk>"], max_length=64,
                                    bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                    extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)])
    text = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=64, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2)
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 16], num_heads=[1, 2], num_groups=[1, 2], window_size=2,
                  projection_dim=16, drop_path_rate=0.0)
    config = Florence2Config(vision_config=vision, text_config=text.to_dict(), image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=17)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def save_tiny_flux_pipeline(folder, seed: int = 0) -> str:
    """A random tiny `FluxPipeline` (transformer, 16-channel AutoencoderKL with factor 8, CLIP text +
    CLIPTokenizer, T5 + a WordPiece tokenizer, FLUX-dev's scheduler), saved to `folder`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(77), tiny_bert_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_clip_text_config(clip_tokenizer, 77)))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, relative_attention_num_buckets=8,
                                             pad_token_id=t5_tokenizer.pad_token_id, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                         guidance_embeds=True, axes_dims_rope=[2, 2, 4])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


def write_sample_shots(tmp_path, toy_world) -> str:
    """shots.jsonl in `tmp_path`: "hero" (a toy scene, one reference) and "wide" (64×32, its own seed 7)."""
    scene = toy_world.scene(3)
    ref = next(i for i in scene.instances if i.foreground)
    Image.fromarray(toy_world.reference(ref.identity)).save(tmp_path / "ref.png")
    lines = [{"id": "hero", "prompt": scene.caption,
              "instances": [{"bbox": list(i.bbox), "caption": i.caption,
                             **({"reference": "ref.png"} if i is ref else {})} for i in scene.instances]},
             {"id": "wide", "prompt": "a grey block", "width": 64, "height": 32, "seed": 7,
              "instances": [{"bbox": [0.1, 0.2, 0.5, 0.9], "caption": "a grey block"}]}]
    path = tmp_path / "shots.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def export_command(fit: list[str]) -> list[str]:
    """`mpp export`'s arguments for a checkpoint of the run `fit` (fit_args): its configs and model/data overrides."""
    configs = [fit[i + 1] for i, a in enumerate(fit) if a == "--config"]
    overrides = [a for a in fit[1:] if a.startswith(("--model.", "--data."))]
    return ["export", *[x for c in configs for x in ("--config", c)], *overrides]
