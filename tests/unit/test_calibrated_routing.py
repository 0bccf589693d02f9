"""The calibrated routing: pure functions on fixed inputs (no eval labels anywhere in their signature)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from ensemble.routing import (
    RoutingParams,
    calibrate_temperature,
    calibrated_weights,
    entropy_bits,
    expert_sq_distances,
    route,
)


def test_expert_sq_distances_take_the_nearest_centre_of_each_expert():
    fine = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    owner = torch.tensor([0, 1, 1])
    d2 = expert_sq_distances(torch.tensor([[0.0, 1.0]]), fine, owner, 3)
    assert d2[0, :2].tolist() == pytest.approx([1.0, 1.0]) and math.isinf(d2[0, 2])


def test_temperature_puts_the_median_margin_at_the_asked_confidence():
    # margins 0.1, 0.2, 0.3 (median 0.2); E = 4: tau = 0.2 / ln(0.9 * 3 / 0.1) = 0.2 / ln 27
    d2 = torch.tensor([[0.5, 0.6, 2.0, 2.0], [0.4, 0.6, 2.0, 2.0], [1.0, 1.3, 2.0, 2.0]], dtype=torch.float64)
    tau = calibrate_temperature(d2, 0.9)
    assert tau == pytest.approx(0.2 / math.log(27.0))
    # a caption with the median margin and the other experts at that margin too gets exactly 0.9
    vote = torch.softmax(-torch.tensor([0.0, 0.2, 0.2, 0.2], dtype=torch.float64) / tau, dim=0)
    assert float(vote[0]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="calibrated_confidence"):
        calibrate_temperature(d2, 0.2)


def test_weights_are_dirichlet_posterior_means_of_soft_votes():
    d2 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    tau = 1.0
    p = torch.softmax(-d2 / tau, dim=1)
    w = calibrated_weights(d2, tau, prior=1.0)
    assert w[0].tolist() == pytest.approx(((p.sum(0) + 0.5) / 4).tolist())
    groups = calibrated_weights(d2, tau, 1.0, torch.tensor([0, 0, 1]), 2)
    assert groups[1].tolist() == pytest.approx(((p[2] + 0.5) / 2).tolist())
    assert torch.allclose(groups.sum(1), torch.ones(2, dtype=torch.float64))


def test_unanimous_clear_votes_route_clearly_and_more_items_route_more():
    e = 4
    d2 = torch.tensor([[0.1, 0.6, 0.6, 0.6]], dtype=torch.float64)
    tau = calibrate_temperature(torch.tensor([[0.0, 0.5, 0.5, 0.5]], dtype=torch.float64), 0.9)
    ten = calibrated_weights(d2.expand(10, e), tau)[0]
    one = calibrated_weights(d2, tau)[0]
    assert ten[0] > 0.8 and entropy_bits(ten) < 1.0 < entropy_bits(one) < 2.0
    split = calibrated_weights(torch.cat([d2.expand(5, e), d2.flip(1).expand(5, e)]), tau)[0]
    assert split[0] == pytest.approx(split[3]) and split[0] > split[1]


def test_route_dispatches_to_the_calibrated_formula_and_takes_no_labels():
    fine = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    owner = torch.tensor([0, 1])
    feats = torch.tensor([[0.9, 0.1], [0.8, 0.3]])
    params = RoutingParams("calibrated", temperature=0.2, prior=1.0)
    result = route(feats, fine, owner, params)
    d2 = expert_sq_distances(feats, fine, owner, 2)
    assert torch.allclose(result.weights, calibrated_weights(d2, 0.2, 1.0))
    for fn in (calibrate_temperature, calibrated_weights, expert_sq_distances):
        assert not {"labels", "targets", "target"} & set(inspect.signature(fn).parameters)
