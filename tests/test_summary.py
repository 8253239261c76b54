"""Model summary against counts worked out by hand for a small conv net on 3x8x8 inputs."""

import json

import pytest
import torch
from torch import nn

from bnn_train.analysis import summarize
from bnn_train.binarize import binarize_

# Per layer, by hand (batch 1, 3x8x8 input):
#   conv0  Conv2d(3, 8, 3, padding=1):           W 8*3*3*3 = 216, bias 8;   out 8x8x8
#          MACs = 8*8 (H*W) * 8 (C_out) * 3*3*3 (C_in*kh*kw) = 13,824
#   bn1    BatchNorm2d(8):                        weight 8 + bias 8 = 16 real (running stats are buffers)
#   conv2  Conv2d(8, 16, 3, stride=2, padding=1): W 16*8*3*3 = 1,152, bias 16; out 16x4x4
#          MACs = 4*4 * 16 * 8*3*3 = 18,432
#   fc4    Linear(256, 10):                       W 2,560, bias 10;  MACs = 256*10 = 2,560
W0, B0, MAC0 = 216, 8, 13_824
BN = 16
W2, B2, MAC2 = 1_152, 16, 18_432
W4, B4, MAC4 = 2_560, 10, 2_560
ALL = W0 + B0 + BN + W2 + B2 + W4 + B4


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def summary_of(scheme: str | None, **kw):
    net = small_net()
    if scheme is not None:
        binarize_(net, scheme, **kw)
    return summarize(net, (3, 8, 8))


def mb(binary: int, real: int) -> float:
    return (binary / 8 + real * 4) / 1e6


@pytest.mark.parametrize("scheme,kw,binary,bops,flops", [
    # fp: everything real.
    (None, {}, 0, 0, MAC0 + MAC2 + MAC4),
    # xnor, first and last real: only the middle conv is W1/A1.
    ("xnor", dict(keep_first_real=True, keep_last_real=True), W2, MAC2, MAC0 + MAC4),
    # bnn, first layer binarized: binary weights but a real (network) input -> its MACs are float.
    ("bnn", dict(keep_first_real=False, keep_last_real=True), W0 + W2, MAC2, MAC0 + MAC4),
    # bnn, last layer binarized too: the linear layer gets binary inputs -> XNOR-popcount.
    ("bnn", dict(keep_first_real=False, keep_last_real=False), W0 + W2 + W4, MAC2 + MAC4, MAC0),
    # bwn: binary weights, real inputs everywhere -> no BOPs at all.
    ("bwn", dict(keep_first_real=False, keep_last_real=False), W0 + W2 + W4, 0, MAC0 + MAC2 + MAC4),
])
def test_totals_match_hand_counts(scheme, kw, binary, bops, flops):
    t = summary_of(scheme, **kw).totals
    assert t["binary_params"] == binary
    assert t["real_params"] == ALL - binary
    assert t["params"] == ALL
    assert t["bops"] == bops
    assert t["flops"] == flops
    assert t["ops"] == pytest.approx(bops / 64 + flops)
    assert t["size_packed_mb"] == pytest.approx(mb(binary, ALL - binary))
    assert t["size_fp32_mb"] == pytest.approx(ALL * 4 / 1e6)
    assert t["compression"] == pytest.approx(t["size_fp32_mb"] / t["size_packed_mb"])


def test_rows_of_bnn_model():
    s = summary_of("bnn", keep_first_real=False, keep_last_real=True)
    rows = {r.name: r for r in s.rows}
    assert list(rows) == ["0", "2", "4", "other (BN, activations, ...)"]
    r0, r2, r4, other = rows.values()
    assert (r0.kind, r0.weight_shape, r0.out_shape, r0.bits) == ("conv", (8, 3, 3, 3), (8, 8, 8), "1/32")
    assert (r0.binary_params, r0.real_params, r0.binary_macs, r0.float_macs) == (W0, B0, 0, MAC0)
    assert (r2.out_shape, r2.bits, r2.binary_params, r2.real_params, r2.binary_macs, r2.float_macs) == (
        (16, 4, 4), "1/1", W2, B2, MAC2, 0)
    assert (r4.kind, r4.out_shape, r4.bits, r4.binary_params, r4.real_params, r4.float_macs) == (
        "linear", (10,), "32/32", 0, W4 + B4, MAC4)
    assert (other.kind, other.real_params, other.binary_macs, other.float_macs) == ("other", BN, 0, 0)
    assert r0.packed_bytes == W0 / 8 + B0 * 4
    assert r4.packed_bytes == (W4 + B4) * 4
    # Rows add up to the totals when no parameter is shared between layers.
    assert sum(r.binary_params for r in s.rows) == s.totals["binary_params"]
    assert sum(r.real_params for r in s.rows) == s.totals["real_params"]
    assert sum(r.packed_bytes for r in s.rows) / 1e6 == pytest.approx(s.totals["size_packed_mb"])


def test_quantizer_parameters_count_as_real():
    net = small_net()
    binarize_(net, "bnn", keep_first_real=True, keep_last_real=True)
    net[2].input_quantizer.threshold = nn.Parameter(torch.zeros(8))  # e.g. a learnable per-channel threshold
    row = next(r for r in summarize(net, (3, 8, 8)).rows if r.name == "2")
    assert (row.binary_params, row.real_params) == (W2, B2 + 8)


def test_grouped_conv_and_repeated_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.conv(self.conv(x)[:, :4])  # called twice
            return self.fc(x.mean((2, 3)))

    s = summarize(Twice(), (4, 5, 5))
    conv = s.rows[0]
    assert conv.float_macs == 2 * (5 * 5 * 8 * (4 // 2) * 3 * 3)
    assert conv.real_params == 8 * 2 * 3 * 3


def test_train_eval_mode_restored_and_rng_untouched():
    net = small_net()
    binarize_(net, "xnor")
    net.train()
    net[1].eval()  # a frozen BatchNorm must stay frozen
    state = torch.get_rng_state()
    summarize(net, (3, 8, 8))
    assert net.training and net[0].training and not net[1].training
    assert torch.equal(torch.get_rng_state(), state)
    net.eval()
    summarize(net, (3, 8, 8))
    assert not any(m.training for m in net.modules())


def test_no_hooks_left_behind():
    net = small_net()
    summarize(net, (3, 8, 8))
    assert all(not m._forward_hooks for m in net.modules())


def test_markdown_and_dict():
    s = summary_of("bnn", keep_first_real=False, keep_last_real=True)
    md = s.to_markdown()
    assert md.startswith("| layer |")
    assert "| `2` | conv | 1/1 | 16x8x3x3 | 16x4x4 | 1,152 | 16 | 18,432 | 0 | 208 |" in md
    assert "other (BN, activations, ...)" in md
    assert f"{W0 + W2:,} binary + {ALL - W0 - W2:,} real = {ALL:,}" in md
    assert f"BOPs (binary MACs, XNOR-popcount): {MAC2:,}" in md
    assert f"FLOPs (real MACs): {MAC0 + MAC4:,}" in md
    assert f"OPs = BOPs/64 + FLOPs: {MAC2 / 64 + MAC0 + MAC4:,.0f}" in md
    assert f"{s.totals['size_packed_mb']:.4f} MB packed" in md
    assert "buffers such as BatchNorm running stats not counted" in md
    d = json.loads(json.dumps(s.to_dict()))
    assert d["input_shape"] == [3, 8, 8]
    assert d["totals"]["bops"] == MAC2
    assert d["rows"][1]["weight_shape"] == [16, 8, 3, 3]
    assert d["rows"][1]["packed_bytes"] == W2 / 8 + B2 * 4


def test_mlp_without_other_parameters():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Linear(6, 2))
    s = summarize(net, (3, 2, 2))
    assert [r.kind for r in s.rows] == ["linear", "linear"]  # no "other" row when there is nothing else
    assert s.totals["flops"] == 12 * 6 + 6 * 2
