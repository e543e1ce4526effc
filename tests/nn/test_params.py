"""The parameter report on the real FLUX.1-dev config (meta device: nothing allocated)."""

from __future__ import annotations

from mpp.nn.params import main


def test_real_flux_dev_report(capsys):
    report = main([])
    printed = capsys.readouterr().out
    groups = report["groups"]
    assert set(groups) == {"alpha", "instance_encoder", "layout", "lora", "modulation", "feedback"}
    assert all(n > 0 for n in groups.values())
    assert 11_000_000_000 < report["backbone"] < 13_000_000_000  # FLUX.1-dev transformer ≈ 11.9B
    # LoRA rank 128 on 3072→3072 projections: 8 per layout double block (7) + 3 in single block 0
    assert groups["lora"] == 128 * (3072 + 3072) * (7 * 8 + 3)
    assert report["heads_total"] == sum(groups.values())
    assert report["ratio"] < 0.10
    for word in ("lora", "heads total", "backbone", "heads / backbone"):
        assert word in printed
