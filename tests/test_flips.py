"""FlipTracker: the fraction of binary weights whose sign changed between two update() calls."""

import torch
from torch import nn

from bnn_train.analysis import FlipTracker
from bnn_train.binarize import binarize_


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardtanh(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.Hardtanh(), nn.Conv2d(16, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))
    binarize_(model, "xnor", act_scale="none")  # first and last layer real: layers "2" and "4" are binarized
    return model


def negate_(w: torch.Tensor, k: int) -> None:
    """Flip the sign of the first k weights, none of them zero."""
    with torch.no_grad():
        flat = w.view(-1)
        flat[:k] = torch.where(flat[:k] == 0, -1.0, -flat[:k])


def test_reports_k_over_n_per_layer_and_overall():
    model = net()
    tracker = FlipTracker(model)
    n2, n4 = model[2].weight.numel(), model[4].weight.numel()  # 1152, 576
    negate_(model[2].weight, 100)
    negate_(model[4].weight, 7)
    flips = tracker.update()
    assert set(flips) == {"flip/2", "flip/4", "flip/all"}
    assert flips["flip/2"] == 100 / n2
    assert flips["flip/4"] == 7 / n4
    assert flips["flip/all"] == 107 / (n2 + n4)
    # Nothing changed since: all zero.
    assert tracker.update() == {"flip/2": 0.0, "flip/4": 0.0, "flip/all": 0.0}


def test_flipping_back_counts_again_and_zero_is_positive():
    model = net()
    w = model[2].weight
    with torch.no_grad():
        w.view(-1)[0] = 0.5
    tracker = FlipTracker(model)
    with torch.no_grad():
        w.view(-1)[0] = 0.0  # sign(0) = +1: no flip
    assert tracker.update()["flip/2"] == 0.0
    with torch.no_grad():
        w.view(-1)[0] = -0.25
    assert tracker.update()["flip/2"] == 1 / w.numel()
    with torch.no_grad():
        w.view(-1)[0] = 0.25  # back again: a flip relative to the previous call, not to construction
    assert tracker.update()["flip/2"] == 1 / w.numel()


def test_optimizer_step_gives_ratios_in_unit_interval():
    model = net()
    tracker = FlipTracker(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.randn(16, 3, 4, 4), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    flips = tracker.update()
    assert set(flips) == {"flip/2", "flip/4", "flip/all"}
    assert all(0.0 <= v <= 1.0 for v in flips.values())
    assert flips["flip/all"] > 0  # lr=1 on weights of magnitude ~0.1 must flip some signs


def test_no_binarized_layers_gives_empty_dict():
    model = nn.Sequential(nn.Linear(4, 4))
    assert FlipTracker(model).update() == {}
    binarize_(model, "bwn", keep_first_real=True)  # a single layer is kept real by the first-layer policy
    assert FlipTracker(model).update() == {}


def test_keeps_bools_not_float_copies():
    tracker = FlipTracker(net())
    assert all(s.dtype == torch.bool for s in tracker._signs.values())


def test_layer_binarized_after_construction_is_picked_up():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    tracker = FlipTracker(model)
    binarize_(model, "bnn", keep_first_real=True, keep_last_real=True)  # layer "1" becomes binary now: this
    # update only takes its reference
    assert tracker.update() == {}
    negate_(model[1].weight, 4)
    assert tracker.update() == {"flip/1": 4 / 16, "flip/all": 4 / 16}
