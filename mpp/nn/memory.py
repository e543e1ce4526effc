"""A rough estimate of an MppFlux training step's device memory: weights by dtype, what the optimizer
adds for the trained parameters, and the activations autograd keeps, with or without gradient
checkpointing. Meant for the meta device (``bench/flux_gpu.py --dry-run``): no weights are needed."""

from __future__ import annotations

from collections import defaultdict

from torch import nn

# activations autograd keeps per token of a block's sequence, in D-wide tensors of the compute dtype:
# measured on mpp's block forward (bf16, CPU, saved-tensor hooks, distinct storages, block inputs
# excluded): double 16.3, single 13.9; the flash and memory-efficient kernels keep the same (output and
# log-sum-exp, no score matrix)
SAVED_PER_TOKEN = {"double": 16.3, "single": 13.9}
GIB = 2**30


def memory_estimate(model: nn.Module, *, batch: int, image_tokens: int, text_tokens: int, checkpointing: bool,
                    activation_bytes: int = 2) -> dict:
    """Bytes of: weights by dtype; gradients and AdamW's two moments of the trained parameters (in
    their dtype); activations (each block's saved tensors, or with checkpointing each block's inputs
    plus one block's recompute); and their total. Assemble-Attn's own activations (the packed in-box
    tokens of the layout blocks) and the allocator's fragmentation are not counted."""
    weights: dict[str, int] = defaultdict(int)
    trained = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = p.numel() * p.element_size()
        weights[str(p.dtype).removeprefix("torch.")] += size
        if p.requires_grad:
            trained += 3 * size  # gradient, exp_avg, exp_avg_sq
    bb = model.backbone
    tensor = batch * (image_tokens + text_tokens) * bb.inner_dim * activation_bytes  # one D-wide tensor
    blocks = [("double", len(bb.transformer_blocks)), ("single", len(bb.single_transformer_blocks))]
    if checkpointing:  # each block keeps its input streams; the backward recomputes one block at a time
        activations = sum(n for _, n in blocks) * tensor + max(SAVED_PER_TOKEN.values()) * tensor
    else:
        activations = sum(SAVED_PER_TOKEN[kind] * n for kind, n in blocks) * tensor
    total = sum(weights.values()) + trained + activations
    return {"weights": dict(weights), "optimizer_and_grads": trained, "activations": int(activations),
            "total": int(total)}
