"""MppFlux: FLUX.1 transformer driven by mpp's own block loop, with the layout, identity and feedback heads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from .alpha import AlphaPredictor, gate_alpha
from .assemble_attn import InstanceLayout, box_centre_ids, box_mean, build_layout
from .blocks import AssembleInput, double_block_forward, single_block_forward
from .config import DEFAULT_GUIDANCE, HeadsConfig
from .feedback import FeedbackBridge
from .instance_encoder import InstanceEncoder, NullEmbeddings
from .lora import add_lora, check_scope, lora_parameters, lora_state_dict, lora_target_modules
from .modulation import ModulationHead, zero_linear
from .packing import image_ids, pack_latents, text_ids, unpack_latents

GROUPS = ("alpha", "instance_encoder", "layout", "lora", "modulation", "feedback")
# α is trained (supervised) in stage 1 only and frozen after it, so the foreground/background split
# the identity heads are weighted by cannot drift while they learn (docs/decisions.md).
STAGE_GROUPS = {
    1: ("alpha", "instance_encoder", "layout", "lora"),
    2: ("instance_encoder", "layout", "lora", "modulation"),
    3: ("feedback",),
}


@dataclass
class MppOutput:
    velocity: Tensor  # B×C×h×w predicted flow (noise − x0)
    alpha: Tensor  # B×N in [0, 1): 0 for padding and for instances whose reference did not reach the heads
    alpha_logit: Tensor  # B×N logits of the predictor (padding entries 0): what the α loss takes where
    # a reference reached the heads
    has_reference: Tensor  # B×N bool: the instance's reference embeddings reached the heads (not missing, not dropped)
    feedback_magnitude: Tensor | None  # mean ‖bridge output‖ / mean ‖instance token‖, None without bridges/instances


def _check_blocks(name: str, blocks, count: int) -> list[int]:
    out = sorted({int(i) for i in blocks})
    bad = [i for i in out if not 0 <= i < count]
    if bad:
        raise ValueError(f"{name} has indices {bad} outside the backbone's {count} blocks")
    return out


class MppFlux(nn.Module):
    """The backbone with mpp's heads; `heads` says which and how wide (default: `HeadsConfig()`)."""

    def __init__(self, backbone: FluxTransformer2DModel, *, clip_dim: int, dino_dim: int, text_dim: int,
                 heads: HeadsConfig | None = None):
        super().__init__()
        heads = heads or HeadsConfig()
        lora_rank, lora_scope, use_layout_head = heads.lora_rank, heads.lora_scope, heads.use_layout_head
        check_scope(lora_scope)
        if lora_scope == "layout" and not use_layout_head and lora_rank > 0:
            raise ValueError(
                "lora_scope='layout' puts LoRA only inside the Assemble-Attn branch, which use_layout_head=False "
                "removes; use lora_scope='all' or lora_rank=0"
            )
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        cfg = backbone.config
        n_double, n_single = cfg.num_layers, cfg.num_single_layers
        layout_double_blocks = heads.layout_double_blocks
        if layout_double_blocks is None:
            layout_double_blocks = list(range(0, n_double, 3))
        layout_single_blocks = heads.layout_single_blocks
        if layout_single_blocks is None:
            layout_single_blocks = [0] if n_single > 0 else []
        self.layout_double_blocks = _check_blocks("layout_double_blocks", layout_double_blocks, n_double)
        self.layout_single_blocks = _check_blocks("layout_single_blocks", layout_single_blocks, n_single)
        self._double_slot = {i: j for j, i in enumerate(self.layout_double_blocks)}
        off = len(self.layout_double_blocks)
        self._single_slot = {i: off + j for j, i in enumerate(self.layout_single_blocks)}
        num_layout = off + len(self.layout_single_blocks)

        self.lora_scope = lora_scope
        self.lora_rank = lora_rank
        self.use_layout_head = use_layout_head
        self.instance_rope = heads.instance_rope
        self.gradient_checkpointing = heads.gradient_checkpointing
        inner = backbone.inner_dim
        self.inner_dim = inner

        self.backbone = backbone
        backbone.requires_grad_(False)

        self.null_embeddings = NullEmbeddings(clip_dim, dino_dim, text_dim, heads.modality_dropout,
                                              heads.referenced_caption_dropout)
        self.alpha_predictor = AlphaPredictor(clip_dim, dino_dim)
        self.instance_encoder = (
            InstanceEncoder(clip_dim, dino_dim, text_dim, inner, heads.fourier_freqs) if use_layout_head else None
        )
        self.layout_proj = nn.ModuleList(zero_linear(inner, inner) for _ in range(num_layout if use_layout_head else 0))
        chunks = [6] * len(self.layout_double_blocks) + [3] * len(self.layout_single_blocks)
        self.modulation = ModulationHead(clip_dim, dino_dim, heads.identity_dim, inner, heads.modulation_rank, chunks,
                                         heads.modulation_grid)
        self.feedback = FeedbackBridge(inner, heads.identity_dim, max(num_layout - 1, 0), with_token=use_layout_head)
        # skip the modulation offsets while they are exactly zero (stage 1: frozen zero-initialized `up`
        # layers); False computes them anyway (the tests compare both)
        self.skip_zero_work = True
        self._modulation_zero: tuple[tuple, bool] | None = None

        if lora_rank > 0:
            if lora_scope == "all":
                targets = lora_target_modules(range(n_double), range(n_single))
            else:
                targets = lora_target_modules(self.layout_double_blocks, self.layout_single_blocks)
            if targets:
                add_lora(backbone, targets, lora_rank, heads.lora_alpha)
        for p in lora_parameters(backbone):
            # trainable adapter weights stay float32 beside a bf16/fp16 backbone (as diffusers' LoRA scripts
            # do); peft casts the input to the adapter's dtype and the result back
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
            p.requires_grad_(True)

    # ------------------------------------------------------------------ groups
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        enc = list(self.null_embeddings.parameters())
        if self.instance_encoder is not None:
            enc += list(self.instance_encoder.parameters())
        return {
            "alpha": list(self.alpha_predictor.parameters()),
            "instance_encoder": enc,
            "layout": list(self.layout_proj.parameters()),
            "lora": lora_parameters(self.backbone),
            "modulation": list(self.modulation.parameters()),
            "feedback": list(self.feedback.parameters()),
        }

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The peft adapter weights (``get_peft_model_state_dict``), keys relative to the transformer."""
        if self.lora_rank == 0:
            return {}
        return lora_state_dict(self.backbone)

    def modulation_is_zero(self) -> bool:
        """Whether the modulation head's offsets are exactly zero and stay so during a step: its ``up``
        projections are frozen and all zero. The check reads the weights once (one host sync) and is
        cached until one of them changes (a new tensor or an in-place write such as loading a
        checkpoint, seen in its storage and version counter), so a training step does not sync."""
        ups = list(self.modulation.up.parameters())
        if any(p.requires_grad for p in ups):
            return False
        key = tuple((id(p), p.data_ptr(), p._version) for p in ups)
        if self._modulation_zero is None or self._modulation_zero[0] != key:
            zero = not ups or not bool(torch.stack([p.ne(0).any() for p in ups]).any())
            self._modulation_zero = (key, zero)
        return self._modulation_zero[1]

    @property
    def layout_blocks(self) -> list[tuple[str, int]]:
        return [("double", i) for i in self.layout_double_blocks] + [("single", i) for i in self.layout_single_blocks]

    # ------------------------------------------------------------------ forward
    def _maybe_checkpoint(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _layout_step(self, kind: str, block: nn.Module, slot: int, img, txt, temb, rope,
                     layout: InstanceLayout, inst, code, reading, inst_rope):
        offsets = assemble = None
        if layout.num_pairs > 0:
            if reading is not None:
                offsets = self.modulation.offsets(slot, code, layout, reading).to(img.dtype)
            if self.use_layout_head:
                assemble = AssembleInput(layout, inst, self.layout_proj[slot], inst_rope)
        forward = double_block_forward if kind == "double" else single_block_forward
        txt, img, new_inst = forward(
            block, img, txt, temb, rope,
            lora_in_base=self.lora_scope == "all", img_offsets=offsets, assemble=assemble,
        )
        if new_inst is not None:
            inst = new_inst
        stats = None
        if layout.num_pairs > 0 and slot < len(self.feedback):
            fb_tok, fb_code = self.feedback(slot, box_mean(img, layout))
            if inst is not None:
                stats = torch.stack([fb_tok.float().norm(dim=-1).mean(), inst.float().norm(dim=-1).mean()])
                inst = inst + fb_tok.to(inst.dtype)
            else:
                stats = torch.stack([fb_code.float().norm(dim=-1).mean(), code.float().norm(dim=-1).mean()])
            code = code + fb_code.to(code.dtype)
        return txt, img, inst, code, stats

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        boxes: Tensor,
        instance_mask: Tensor,
        instance_text: Tensor,
        clip_embeds: Tensor,
        dino_embeds: Tensor,
        guidance: Tensor | None = None,
    ) -> MppOutput:
        bb = self.backbone
        b, _, h, w = latents.shape
        gh, gw = h // 2, w // 2
        device = latents.device
        wdtype = bb.x_embedder.weight.dtype

        img = bb.x_embedder(pack_latents(latents).to(wdtype))
        timesteps = torch.as_tensor(timesteps, device=device)
        t = (timesteps.expand(b) if timesteps.ndim == 0 else timesteps).to(img.dtype) * 1000
        pooled = pooled_prompt_embeds.to(wdtype)
        if bb.config.guidance_embeds:
            if guidance is None:
                guidance = torch.full((b,), DEFAULT_GUIDANCE, device=device)
            guidance = torch.as_tensor(guidance, device=device)
            guidance = guidance.expand(b) if guidance.ndim == 0 else guidance
            temb = bb.time_text_embed(t, guidance.to(img.dtype) * 1000, pooled)
        else:
            temb = bb.time_text_embed(t, pooled)
        txt = bb.context_embedder(prompt_embeds.to(wdtype))
        ids = torch.cat([text_ids(txt.shape[1], device=device), image_ids(gh, gw, device=device)], dim=0)
        rope = bb.pos_embed(ids)

        # ---- instances: only the P valid (batch, instance) pairs ever enter the heads
        n = boxes.shape[1]
        mask = instance_mask.bool()
        layout = build_layout(boxes.float(), mask, gh, gw)
        alpha_out = logit_out = torch.zeros(b, n, device=device)
        has_reference = torch.zeros(b, n, dtype=torch.bool, device=device)
        inst = code = alpha = box_p = inst_rope = None
        if layout.num_pairs > 0:
            pb, pk = layout.pair_b, layout.pair_k
            clip_p, dino_p, text_p, box_p, kept = self._pair_inputs(pb, pk, boxes, clip_embeds, dino_embeds,
                                                                    instance_text)
            has_reference = has_reference.index_put((pb, pk), kept)
            logit = self.alpha_predictor(clip_p, dino_p, box_p)
            alpha = gate_alpha(logit, kept)
            alpha_out = alpha_out.to(alpha.dtype).index_put((pb, pk), alpha)
            logit_out = logit_out.to(logit.dtype).index_put((pb, pk), logit)
            if self.instance_encoder is not None:
                inst = self.instance_encoder(box_p, text_p, clip_p, dino_p, alpha).to(img.dtype)
            code = self.modulation.identity_code(dino_p, clip_p)
            if self.instance_rope and inst is not None:
                inst_rope = bb.pos_embed(box_centre_ids(box_p, gh, gw))

        reading = None  # None: no modulation offsets (no instances, or the head is frozen at zero)
        if layout.num_pairs > 0 and not (self.skip_zero_work and self.modulation_is_zero()):
            reading = self.modulation.reading(layout, box_p, alpha)
        stats = []
        stacks = (("double", bb.transformer_blocks, self._double_slot),
                  ("single", bb.single_transformer_blocks, self._single_slot))
        for kind, blocks, slots in stacks:
            for i, block in enumerate(blocks):
                slot = slots.get(i)
                if slot is None:
                    txt, img = self._maybe_checkpoint(block, img, txt, temb, rope)
                    continue
                txt, img, inst, code, s = self._maybe_checkpoint(
                    self._layout_step, kind, block, slot, img, txt, temb, rope, layout, inst, code, reading,
                    inst_rope,
                )
                if s is not None:
                    stats.append(s)

        img = bb.norm_out(img, temb)
        velocity = unpack_latents(bb.proj_out(img), h, w)
        magnitude = None
        if stats:
            s = torch.stack(stats).mean(0)
            magnitude = s[0] / s[1].clamp_min(1e-12)
        return MppOutput(velocity=velocity, alpha=alpha_out, alpha_logit=logit_out, has_reference=has_reference,
                         feedback_magnitude=magnitude)

    def _pair_inputs(self, pb: Tensor, pk: Tensor, boxes, clip_embeds, dino_embeds, instance_text):
        """The (pb, pk) pairs' CLIP, DINO and caption embeddings (missing or dropped ones replaced by
        the null embeddings) and boxes, in the heads' dtype, and whether each kept its reference."""
        hdtype = self.alpha_predictor.mlp[0].weight.dtype
        clip_p, dino_p, text_p, kept = self.null_embeddings(
            clip_embeds[pb, pk].to(hdtype), dino_embeds[pb, pk].to(hdtype), instance_text[pb, pk].to(hdtype))
        return clip_p, dino_p, text_p, boxes[pb, pk].to(hdtype), kept

    def instance_alpha(self, boxes: Tensor, instance_mask: Tensor, clip_embeds: Tensor, dino_embeds: Tensor,
                       instance_text: Tensor) -> Tensor:
        """B×N α from the heads alone (α does not depend on the latents): no backbone forward."""
        pb, pk = instance_mask.bool().nonzero(as_tuple=True)
        out = torch.zeros(instance_mask.shape, device=boxes.device)
        if pb.numel() == 0:
            return out
        clip_p, dino_p, _, box_p, kept = self._pair_inputs(pb, pk, boxes, clip_embeds, dino_embeds, instance_text)
        alpha = gate_alpha(self.alpha_predictor(clip_p, dino_p, box_p), kept)
        return out.to(alpha.dtype).index_put((pb, pk), alpha)


def set_trainable(model: MppFlux, groups: Iterable[str]) -> None:
    """requires_grad True for exactly the parameters of ``groups``, False for everything else."""
    groups = list(groups)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; known groups: {list(GROUPS)}")
    model.requires_grad_(False)
    param_groups = model.parameter_groups()
    for g in groups:
        for p in param_groups[g]:
            p.requires_grad_(True)
