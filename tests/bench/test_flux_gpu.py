"""bench/flux_gpu.py --dry-run: the real FLUX.1-dev config on the meta device, no GPU and no weights."""

from __future__ import annotations

import json

from tests.helpers import load_bench


def test_dry_run_prints_flops_and_memory_of_both_stages(capsys):
    report = load_bench("flux_gpu").main(["--dry-run"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    s1, s2 = report["stages"]["1"], report["stages"]["2"]
    # FLUX.1-dev at 1024², batch 2, 8 instances, LoRA rank 128 on every block: ≈ 343 TFLOP per micro-step,
    # of which the bare backbone + LoRA ≈ 336
    assert 335 < s1["mpp_training_tflop"] < 350 and s1["bare_training_tflop"] < s1["mpp_training_tflop"]
    assert 148 < s1["mpp_forward_tflop"] < 160
    # stage 1 skips the (zero) modulation offsets, stage 2 computes them and adds the identity forward
    assert "modulation_offsets" not in s1["mpp_training_tflop_by_item"]
    assert "modulation_offsets" in s2["mpp_training_tflop_by_item"]
    assert s2["identity_forward_samples"] == 2 and s2["identity_training_tflop"] > 300
    mem = s1["memory_gib"]
    assert 20 < mem["checkpointing"]["weights"]["bfloat16"] < 24  # 11.9 B parameters in bf16
    assert mem["checkpointing"]["total"] < mem["no_checkpointing"]["total"]
    assert 28 < mem["checkpointing"]["total"] < 34  # measured on an H200: 31.0 GiB peak
    for word in ("stage 1", "stage 2", "backbone_linear", "with checkpointing", "without checkpointing"):
        assert word in out
