"""Routing weights against values computed by hand (outside the implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ensemble.routing import Centers, RoutingParams, grouped_weights, nearest_fine, route, task_weights

CODE = RoutingParams("code", (5.0, 8.0), 200, 0.2)
PAPER = RoutingParams("paper", (5.0, 8.0), 200, 0.2)


def f64(values) -> torch.Tensor:
    """Distances exactly as written (0.3, not its float32 neighbour)."""
    return torch.tensor(values, dtype=torch.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_code_formula_three_classes_hand_values():
    # n=3: alpha = 5*log10(max(10, 3-200)) = 5, beta = exp(0.5 - sqrt(3)); classes vote 0, 0, 2
    dist, expert = f64([0.3, 0.5, 0.4]), torch.tensor([0, 0, 2])
    w = task_weights(dist, expert, 3, CODE)
    assert w.tolist() == pytest.approx([0.3621267840362908, 0.3073432571850127, 0.33052995877869656], abs=1e-12)
    beta = math.exp(0.5 - math.sqrt(3))
    scores = np.array([math.exp(5 * (beta - 0.3)) + math.exp(5 * (beta - 0.5)), 0.0, math.exp(5 * (beta - 0.4))])
    assert w.numpy() == pytest.approx(_softmax(scores / 8.0), abs=1e-12)


def test_code_formula_many_classes_sharpens_with_log10():
    # n=300: alpha = 5*log10(100) = 10, beta = 0; 100 classes → expert 0 at d=0.6, 200 → expert 1 at d=0.5
    dist = f64([0.6] * 100 + [0.5] * 200)
    expert = torch.tensor([0] * 100 + [1] * 200)
    w = task_weights(dist, expert, 2, CODE)
    assert w.tolist() == pytest.approx([0.46568794606531666, 0.5343120539346833], abs=1e-12)


def test_code_formula_reproduces_the_mode_digest_arithmetic():
    # mode.md §6: n=100, 70% → expert 0, 30% → expert 1, common d → ≈ [0.62, 0.20, 0.09, 0.09]
    expert = torch.tensor([0] * 70 + [1] * 30)
    w = task_weights(torch.full((100,), 0.3), expert, 4, CODE)
    assert w.tolist() == pytest.approx([0.62, 0.20, 0.09, 0.09], abs=0.01)
    w = task_weights(torch.full((100,), 0.7), expert, 4, CODE)
    assert w.tolist() == pytest.approx([0.30, 0.25, 0.23, 0.23], abs=0.01)


def test_paper_formula_few_classes_softened():
    # n=3 < 10: A = exp(-d^2/0.2) * exp(0.5 - sqrt(3)); p = softmax(sum A per expert), no temperature
    dist, expert = f64([0.3, 0.5, 0.4]), torch.tensor([0, 0, 2])
    w = task_weights(dist, expert, 3, PAPER)
    assert w.tolist() == pytest.approx([0.3795962323134793, 0.2899024045778766, 0.33050136310864414], abs=1e-12)


def test_paper_formula_middle_and_many_classes():
    # n=20: plain A = exp(-d^2/0.2); 12 classes → expert 0 at d=0.3, 8 → expert 1 at d=0.2
    dist = f64([0.3] * 12 + [0.2] * 8)
    expert = torch.tensor([0] * 12 + [1] * 8)
    assert task_weights(dist, expert, 2, PAPER).tolist() == pytest.approx(
        [0.7505769627606895, 0.24942303723931045], abs=1e-12
    )
    # n=300 > 200: lambda = 0.2 / ln(300)
    dist = f64([0.6] * 100 + [0.5] * 200)
    expert = torch.tensor([0] * 100 + [1] * 200)
    assert task_weights(dist, expert, 2, PAPER).tolist() == pytest.approx(
        [0.4609023285222423, 0.5390976714777578], abs=1e-12
    )


def test_groups_are_independent_tasks():
    dist = f64([0.3, 0.5, 0.4, 0.2])
    expert = torch.tensor([0, 1, 1, 0])
    group = torch.tensor([0, 0, 1, 2])
    for params in (CODE, PAPER):
        w = grouped_weights(dist, expert, 2, params, group, 3)
        assert w.shape == (3, 2)
        assert w[0].tolist() == pytest.approx(task_weights(dist[:2], expert[:2], 2, params).tolist())
        assert w[1].tolist() == pytest.approx(task_weights(dist[2:3], expert[2:3], 2, params).tolist())
        assert w[2].tolist() == pytest.approx(task_weights(dist[3:], expert[3:], 2, params).tolist())
    # one query text (n=1) with the code formula: alpha=5, beta=exp(-0.5), only expert 0 scores
    one = math.exp(5 * (math.exp(-0.5) - 0.2)) / 8
    single = task_weights(f64([0.2]), torch.tensor([0]), 2, CODE)
    assert single.tolist() == pytest.approx(_softmax(np.array([one, 0.0])).tolist(), abs=1e-12)


def test_nearest_fine_is_plain_l2_not_squared():
    centers = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    dist, idx = nearest_fine(torch.tensor([[3.0, 0.0], [3.0, 4.5]]), centers)
    assert dist.tolist() == pytest.approx([3.0, 0.5])
    assert idx.tolist() == [0, 1]
    with pytest.raises(ValueError, match="3-d but the fine centres are 2-d"):
        nearest_fine(torch.zeros(1, 3), centers)


def test_route_votes_through_the_fine_to_coarse_map():
    fine = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    centers = Centers(fine, torch.tensor([1, 0, 1]), 2)
    feats = torch.tensor([[0.1, 0.0], [9.9, 0.0], [0.0, 9.0]])
    r = route(feats, centers.fine, centers.fine_to_coarse, CODE, num_experts=2)
    assert r.fine.tolist() == [0, 1, 2]
    assert r.expert.tolist() == [1, 0, 1]
    assert r.weights.shape == (1, 2)
    assert r.weights[0].tolist() == pytest.approx(task_weights(r.dist, r.expert, 2, CODE).tolist())
    assert r.weights[0, 1] > r.weights[0, 0]


def test_unknown_formula_is_refused():
    with pytest.raises(ValueError, match="ensemble.routing"):
        task_weights(torch.tensor([0.1]), torch.tensor([0]), 2, RoutingParams("other"))  # type: ignore[arg-type]
