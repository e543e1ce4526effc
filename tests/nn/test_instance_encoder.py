"""Null embeddings: which instance's reference or caption reaches the heads in training and inference."""

from __future__ import annotations

import pytest
import torch

from mpp.nn.instance_encoder import NullEmbeddings


def _inputs():
    g = torch.Generator().manual_seed(0)
    clip, dino, text = torch.randn(6, 4, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    clip[3:] = 0  # instances 3-5 have no reference (a background element)
    dino[3:] = 0
    return clip, dino, text


def test_referenced_caption_dropout_drops_only_the_captions_of_referenced_instances():
    torch.manual_seed(0)
    nulls = NullEmbeddings(4, 5, 3, modality_dropout=0.0, referenced_caption_dropout=1.0).train()
    clip, dino, text = _inputs()
    clip_o, dino_o, text_o, kept = nulls(clip, dino, text)
    assert kept.tolist() == [True] * 3 + [False] * 3
    assert torch.equal(text_o[:3], nulls.text.detach().expand(3, -1))  # the reference alone carries these
    assert torch.equal(text_o[3:], text[3:])  # a background element keeps its caption
    assert torch.equal(clip_o[:3], clip[:3]) and torch.equal(dino_o[:3], dino[:3])
    nulls.eval()  # never at inference
    assert torch.equal(nulls(clip, dino, text)[2], text)


def test_without_it_captions_drop_at_the_modality_rate_whatever_the_reference():
    torch.manual_seed(0)
    nulls = NullEmbeddings(4, 5, 3, modality_dropout=0.0).train()
    clip, dino, text = _inputs()
    assert torch.equal(nulls(clip, dino, text)[2], text)


@pytest.mark.parametrize("kwargs, flag", [({"modality_dropout": 1.5}, "heads.modality_dropout"),
                                          ({"referenced_caption_dropout": -0.1}, "heads.referenced_caption_dropout")])
def test_dropout_outside_zero_one_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        NullEmbeddings(4, 5, 3, **kwargs)
