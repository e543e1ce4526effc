"""Analytic FLOP count of an MppFlux step, for model-FLOP utilisation (MFU).

Every matrix product of the forward is counted (2·m·k·n FLOPs); elementwise work (norms, RoPE,
activations, softmax) is not, as MFU conventions do. Each product belongs to an *item* whose
multiplier turns its forward FLOPs into the useful FLOPs of a training step:

* 3: trained weights (forward, input gradient, weight gradient) and attention inside the gradient
  path (forward QKᵀ and AV; backward dQ, dK, dV and dP: twice the forward);
* 2: frozen weights whose input carries gradient (forward and input gradient only), e.g. the
  backbone's linear layers, and constant-matrix products such as the box scatter;
* 1: layers whose input carries no gradient and whose weights are frozen (the embedders of latents,
  text and time, the AdaLN modulation of the time embedding): no backward at all.

Recompute from gradient checkpointing is never counted (it is overhead, not useful work). Assemble-Attn
attention is counted exactly, Σ over (sample, instance) pairs of 4·(1 + m)²·D for a box of m tokens,
whatever the kernel pads. Two small simplifications, each well under 1 % of a FLUX step: every block
counts its input gradient (the first block's base path needs none when nothing before it trains), and
every trained head counts 3× (a first layer fed by data needs no input gradient).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .assemble_attn import build_layout
from .lora import DOUBLE_TARGETS, SINGLE_TARGETS, is_lora_layer


def mm(tokens: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of a linear layer on ``tokens`` rows (bias and activation not counted)."""
    return 2 * tokens * fan_in * fan_out


def attention(queries: int, keys: int, width: int) -> int:
    """FLOPs of QKᵀ and AV of one sequence (all heads together: ``width`` = heads · head_dim)."""
    return 4 * queries * keys * width


@dataclass
class StepFlops:
    """Forward FLOPs per item, and each item's training multiplier (module docstring)."""

    forward: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    multiplier: dict[str, int] = field(default_factory=dict)

    def add(self, item: str, flops: int, multiplier: int) -> None:
        if self.multiplier.setdefault(item, multiplier) != multiplier:
            raise ValueError(f"item {item!r} counted with multipliers {self.multiplier[item]} and {multiplier}")
        self.forward[item] += int(flops)

    @property
    def training(self) -> dict[str, int]:
        return {k: v * self.multiplier[k] for k, v in self.forward.items()}

    @property
    def total_forward(self) -> int:
        return sum(self.forward.values())

    @property
    def total_training(self) -> int:
        return sum(self.training.values())

    def __add__(self, other: StepFlops) -> StepFlops:
        out = StepFlops()
        for part in (self, other):
            for k, v in part.forward.items():
                out.add(k, v, part.multiplier[k])
        return out


def _trains(params) -> bool:
    return any(p.requires_grad for p in params)


def _lora_rank(module: nn.Module) -> int:
    """Sum of the active adapters' ranks of a (peft) projection; 0 without LoRA."""
    if not is_lora_layer(module) or module.disable_adapters or module.merged:
        return 0
    return sum(module.lora_A[n].out_features for n in module.active_adapters if n in module.lora_A.keys())


def _lora(step: StepFlops, module: nn.Module, tokens: int, multiplier: int) -> None:
    r = _lora_rank(module)
    if r:
        step.add("lora", mm(tokens, module.in_features, r) + mm(tokens, r, module.out_features), multiplier)


def backbone_flops(backbone: nn.Module, *, batch: int, image_tokens: int, text_tokens: int,
                   lora_multiplier: int = 3, lora_in_base: bool = True) -> StepFlops:
    """The FLUX transformer's own forward (diffusers' or mpp's base path) over ``batch`` samples of
    ``image_tokens`` + ``text_tokens``, with every injected LoRA adapter active when ``lora_in_base``."""
    cfg = backbone.config
    d = backbone.inner_dim
    s, txt = batch * image_tokens, batch * text_tokens
    step = StepFlops()
    # inputs of no gradient: latent, text and time embedders, AdaLN of the time embedding
    step.add("backbone_inputs", mm(s, cfg.in_channels, d) + mm(txt, cfg.joint_attention_dim, d), 1)
    tte = backbone.time_text_embed
    embed = mm(batch, 256, d) + mm(batch, d, d) + mm(batch, cfg.pooled_projection_dim, d) + mm(batch, d, d)
    if getattr(tte, "guidance_embedder", None) is not None:
        embed += mm(batch, 256, d) + mm(batch, d, d)
    adaln = len(backbone.transformer_blocks) * 2 * mm(batch, d, 6 * d)
    adaln += len(backbone.single_transformer_blocks) * mm(batch, d, 3 * d) + mm(batch, d, 2 * d)
    step.add("backbone_inputs", embed + adaln, 1)
    joint = image_tokens + text_tokens
    for block in backbone.transformer_blocks:
        step.add("backbone_linear", (s + txt) * 2 * 12 * d * d, 2)  # q, k, v, out (4·D²) + feed-forward (8·D²)
        step.add("backbone_attention", batch * attention(joint, joint, d), 3)
        if lora_in_base:
            for name in DOUBLE_TARGETS:
                tokens = s if name in ("to_q", "to_k", "to_v", "to_out.0") else txt
                _lora(step, block.attn.get_submodule(name), tokens, lora_multiplier)
    for block in backbone.single_transformer_blocks:
        step.add("backbone_linear", (s + txt) * 2 * 12 * d * d, 2)  # q, k, v (3·D²), mlp (4·D²), out (5·D²)
        step.add("backbone_attention", batch * attention(joint, joint, d), 3)
        if lora_in_base:
            for name in SINGLE_TARGETS:
                _lora(step, block.attn.get_submodule(name), s + txt, lora_multiplier)
    step.add("backbone_linear", mm(s, d, backbone.proj_out.out_features), 2)
    return step


def mpp_flops(model: nn.Module, *, batch: int, latent_hw: tuple[int, int], text_tokens: int, boxes: torch.Tensor,
              instance_mask: torch.Tensor, modulate: bool | None = None) -> StepFlops:
    """One MppFlux forward (and its training multipliers, from which parameters require grad) for
    ``batch`` samples of ``latent_hw`` latents, ``text_tokens`` prompt tokens and the given boxes
    (B×N×4 normalized, B×N mask; their token counts decide Assemble-Attn's work). ``modulate``: whether
    the modulation offsets are computed (None: as the model decides; on the meta device, where weights
    have no values, a frozen modulation head counts as its zero initialisation, i.e. skipped)."""
    bb = model.backbone
    d = model.inner_dim
    gh, gw = latent_hw[0] // 2, latent_hw[1] // 2
    groups = model.parameter_groups()
    trains = {g: _trains(ps) for g, ps in groups.items()}
    lora_m = 3 if trains["lora"] else 2
    step = backbone_flops(bb, batch=batch, image_tokens=gh * gw, text_tokens=text_tokens, lora_multiplier=lora_m,
                          lora_in_base=model.lora_scope == "all")
    layout = build_layout(boxes.float().cpu(), instance_mask.bool().cpu(), gh, gw)
    p, n, s = layout.num_pairs, boxes.shape[1], gh * gw
    if p == 0:
        return step
    t = int(layout.count_pair.sum())
    exact = sum((1 + m) ** 2 for m in layout.count_pair.tolist())

    alpha = model.alpha_predictor.mlp
    step.add("alpha", sum(mm(p, lin.in_features, lin.out_features) for lin in alpha if isinstance(lin, nn.Linear)),
             3 if trains["alpha"] else 1)
    if model.instance_encoder is not None:
        enc = model.instance_encoder
        lins = [enc.proj_clip, enc.proj_dino, *(m for m in enc.mlp if isinstance(m, nn.Linear))]
        step.add("instance_encoder", sum(mm(p, m.in_features, m.out_features) for m in lins),
                 3 if trains["instance_encoder"] else 1)
    mod = model.modulation
    code_m = 3 if trains["modulation"] else 1
    step.add("modulation", sum(mm(p, m.in_features, m.out_features) for m in mod.code if isinstance(m, nn.Linear)),
             code_m)
    if modulate is None:
        if any(q.is_meta for q in mod.up.parameters()):
            modulate = trains["modulation"] or not model.skip_zero_work
        else:
            modulate = not (model.skip_zero_work and model.modulation_is_zero())
    for slot, (kind, i) in enumerate(model.layout_blocks):
        block = bb.transformer_blocks[i] if kind == "double" else bb.single_transformer_blocks[i]
        attn = block.attn
        if modulate:
            down, up = mod.down[slot], mod.up[slot]
            # the low-rank code of each box (its G×G map), and `up` once per token on the α-weighted mean
            step.add("modulation_offsets", mm(p, down.in_features, down.out_features)
                     + mm(batch * s, up.in_features, up.out_features), 3 if trains["modulation"] else 2)
            if mod.grid == 1:  # one value per box, spread by a membership matmul (a map is read by grid_sample)
                step.add("modulation_spread", 2 * batch * s * n * (mod.rank + 1), 2)
        if model.use_layout_head:
            add_lora = model.lora_scope != "all"
            if kind == "double":
                inst_proj = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
                # instance q/k/v, to_add_out, context feed-forward on P; to_out on the T packed tokens
                step.add("assemble_linear", mm(p, d, d) * 4 + mm(p, d, 4 * d) * 2 + mm(t, d, d), 2)
                for m in (*inst_proj, attn.to_add_out):
                    _lora(step, m, p, lora_m)
                _lora(step, attn.to_out[0], t, lora_m)
            else:
                inst_proj = (attn.to_q, attn.to_k, attn.to_v)
                # instance q/k/v, mlp and proj_out on P; proj_out's attention columns on T
                step.add("assemble_linear", mm(p, d, d) * 3 + mm(p, d, 4 * d) + mm(p, 5 * d, d) + mm(t, d, d), 2)
                for m in inst_proj:
                    _lora(step, m, p, lora_m)
            if add_lora:
                for m in (attn.to_q, attn.to_k, attn.to_v):
                    _lora(step, m, t, lora_m)
            step.add("assemble_attention", 4 * exact * d, 3)  # Σ attention(1 + m, 1 + m, d)
            step.add("layout", mm(t, d, d), 3 if trains["layout"] else 2)
        if slot < len(model.feedback):
            proj = model.feedback.proj[slot]
            step.add("feedback_pool", 2 * batch * n * s * d, 2)
            step.add("feedback", mm(p, proj.in_features, proj.out_features), 3 if trains["feedback"] else 2)
    return step

