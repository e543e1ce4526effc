"""Each stage trains exactly its groups: one optimizer step changes those parameters and nothing else."""

from __future__ import annotations

import pytest
import torch

from mpp.nn import GROUPS, STAGE_GROUPS, set_trainable
from tests.helpers import make_inputs, randomize

STAGES = [
    (1, {"alpha", "instance_encoder", "layout", "lora"}),
    (2, {"instance_encoder", "layout", "lora", "modulation"}),  # α frozen after stage 1
    (3, {"feedback"}),
]


@pytest.mark.parametrize("stage,groups", STAGES)
def test_one_step_changes_exactly_the_stage_groups(make_model, stage, groups):
    assert set(STAGE_GROUPS[stage]) == groups
    model, _ = make_model(modality_dropout=0.0)
    randomize(model)  # every head live, so every trainable tensor gets a gradient
    set_trainable(model, groups)
    model.train()
    inputs = make_inputs(seed=stage, n=4)
    inputs["clip_embeds"][1, 0] = 0  # missing modalities exercise the null embeddings
    inputs["dino_embeds"][1, 1] = 0
    inputs["instance_text"][1, 2] = 0

    param_group = {}
    for g, ps in model.parameter_groups().items():
        for p in ps:
            param_group[id(p)] = g
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == {n for n, p in names.items() if param_group.get(id(p)) in groups}
    before = {n: p.detach().clone() for n, p in names.items()}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    out = model(**inputs)
    loss = out.velocity.square().mean() + out.alpha.sum()
    loss.backward()
    opt.step()

    changed = {n for n, p in names.items() if not torch.equal(p.detach(), before[n])}
    # no step moves the null DINO embedding: it stands in only where a reference is missing, where α
    # is 0, and α weighs both of DINO's readers (the instance token's DINO part, the modulation offsets)
    unused = {"null_embeddings.dino"} & trainable
    assert changed == trainable - unused
    assert not any(n.startswith("backbone.") and ".lora_" not in n for n in changed)
    # every parameter of every trained group moved, and no group outside the stage did
    assert {param_group[id(names[n])] for n in changed} == groups


def test_set_trainable_rejects_unknown_group(make_model):
    model, _ = make_model()
    with pytest.raises(ValueError, match="bogus"):
        set_trainable(model, ["alpha", "bogus"])


def test_parameter_groups_partition_trainables(make_model):
    model, _ = make_model()
    groups = model.parameter_groups()
    assert tuple(groups) == GROUPS
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert all(len(ps) > 0 for ps in groups.values())
    # at construction: heads and LoRA trainable, backbone frozen
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set(ids)
