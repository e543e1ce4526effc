"""α: σ of the predictor's logit where the instance's reference reached the heads, 0 where it did not."""

from __future__ import annotations

import torch

from mpp.nn.alpha import gate_alpha
from tests.helpers import make_inputs, randomize


def test_alpha_is_zero_exactly_where_the_reference_is_missing_or_dropped(make_model):
    model, _ = make_model(modality_dropout=0.0)
    randomize(model)
    inputs = make_inputs(seed=4, n=3, mask=torch.ones(2, 3, dtype=torch.bool))
    inputs["clip_embeds"][0, 1] = 0  # one modality missing: the reference counts as missing
    inputs["dino_embeds"][1, 2] = 0
    with torch.no_grad():
        out = model(**inputs)
    missing = torch.tensor([[False, True, False], [False, False, True]])
    assert torch.equal(out.has_reference, ~missing)
    assert (out.alpha[missing] == 0).all()
    torch.testing.assert_close(out.alpha[~missing], torch.sigmoid(out.alpha_logit[~missing]))
    assert (out.alpha[~missing] > 0).all()
    # the same with every reference dropped in training
    model.train()
    model.null_embeddings.modality_dropout = 1.0
    dropped = model(**inputs)
    assert not dropped.has_reference.any() and (dropped.alpha == 0).all()


def test_gate_alpha_passes_no_gradient_through_a_missing_reference():
    logit = torch.tensor([0.3, -1.0], requires_grad=True)
    alpha = gate_alpha(logit, torch.tensor([True, False]))
    alpha.sum().backward()
    assert alpha[1] == 0 and logit.grad[1] == 0 and logit.grad[0] > 0
