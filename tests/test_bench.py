"""The training benchmark: its baseline computes the same network, and a tiny run reports ratios."""

import json

import pytest
import torch

from bnn_train.bench.train_speed import build_variants, main


@pytest.mark.parametrize("scheme", ["bnn", "xnor"])
def test_research_baseline_layers_compute_the_same_binarized_product(scheme):
    """Layer by layer on the same input, with exact zeros removed from inputs and weights: the
    research baseline uses torch.sign, whose sign(0) = 0. Its XNOR has no activation scale K
    (as most ports), so K is switched off on ours for the comparison."""
    torch.manual_seed(0)
    variants, _ = build_variants("mlp", scheme, 16, torch.device("cpu"), "fp32", False)
    by_name = {v.name: v for v in variants}
    binary, research = by_name["binary"].model, by_name["research"].model
    x = torch.randn(16, 4096)
    for name in ("features.4", "features.7"):
        ours, theirs = binary.get_submodule(name), research.get_submodule(name)
        with torch.no_grad():
            for w in (ours.weight, theirs.weight):
                w[w == 0] = 1e-3
            ours.act_scale = None
            assert torch.allclose(ours(x), theirs(x.clone()), rtol=1e-5, atol=1e-4), name
    assert sum(p.numel() for p in by_name["fp32"].model.parameters()) == \
        sum(p.numel() for p in binary.parameters())


def test_a_tiny_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--models", "mlp", "--schemes", "bnn", "--batch", "8", "--steps", "1", "--rounds", "1",
                 "--warmup", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| mlp | bnn | 8 |" in printed
    result = json.loads(out.read_text())["results"][0]
    assert set(result["variants"]) == {"binary", "fp32", "fp_policy", "research"}
    assert all(v["samples_per_s"] > 0 and v["memory_bytes"] > 0 for v in result["variants"].values())
    assert result["ratios"]["binary/fp32"] > 0
