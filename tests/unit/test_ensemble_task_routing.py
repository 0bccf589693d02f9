"""Task routing of the two evaluators with a fake text model (no MiniLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.evaluators import retrieval, zeroshot
from ensemble.routing import Centers, RoutingParams, task_weights
from pipeline.config import EnsembleConfig
from tests.conftest import jpeg_bytes, write_shard
from training.evaluation.tasks import EvalTask, load_task

# two fine centres on the axes, one per expert
CENTERS = Centers(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), 2)
POINTS = {"cat": [1.0, 0.1], "dog": [0.9, 0.0], "car": [0.0, 0.7]}


def fake_embed(texts, templates=None):
    """Looks up the last word of every text (after templating and averaging: same point)."""
    if templates is not None:
        prompts = [[fill(t) for fill in templates] for t in texts]
        assert all(p[0].endswith(t + ".") for p, t in zip(prompts, texts, strict=True))
    return np.array([POINTS[t.split()[-1]] for t in texts], dtype=np.float32)


def dist(name: str, center: int) -> float:
    return float(np.linalg.norm(np.array(POINTS[name], dtype=np.float32) - CENTERS.fine[center].numpy()))


@pytest.mark.parametrize("formula", ["code", "paper"])
def test_zeroshot_route_uses_class_names(formula):
    task = EvalTask("pets", "classification", Path("."), "wds", (), classnames=("cat", "dog", "car"),
                    templates=("a photo of a {c}.",))
    ecfg = EnsembleConfig(routing=formula)
    weights, summary = zeroshot.route(task, fake_embed, CENTERS, ecfg)
    params = RoutingParams(formula, (5.0, 8.0), 200, 0.2)
    d = torch.tensor([dist("cat", 0), dist("dog", 0), dist("car", 1)], dtype=torch.float64)
    expected = task_weights(d, torch.tensor([0, 0, 1]), 2, params)
    assert weights["task"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert summary["votes"] == [2, 1] and summary["weights"] == pytest.approx(expected.tolist(), abs=1e-6)


def _retrieval_task(tmp_path: Path) -> EvalTask:
    root = tmp_path / "ret"
    root.mkdir()
    (root / "task.json").write_text('{"type": "retrieval"}')
    members = [
        ("a.jpg", jpeg_bytes()), ("a.json", json.dumps({"texts": ["a cat", "a car"]}).encode()),
        ("b.jpg", jpeg_bytes()), ("b.json", json.dumps({"texts": ["a dog"]}).encode()),
    ]
    write_shard(root / "test-000000.tar", members)
    return load_task(root)


@pytest.mark.parametrize("image_routing", ["corpus", "captions"])
def test_retrieval_route_per_query(tmp_path, image_routing):
    task = _retrieval_task(tmp_path)
    ecfg = EnsembleConfig(retrieval_image_routing=image_routing, routing="code")
    weights, summary = retrieval.route(task, fake_embed, CENTERS, ecfg)
    params = RoutingParams("code", (5.0, 8.0), 200, 0.2)

    def w(names, experts):
        d = torch.tensor([dist(n, e) for n, e in zip(names, experts, strict=True)], dtype=torch.float64)
        return task_weights(d, torch.tensor(experts), 2, params).tolist()

    # every caption is its own task of n = 1
    expected_text = [w(["cat"], [0]), w(["car"], [1]), w(["dog"], [0])]
    assert torch.allclose(weights["text"], torch.tensor(expected_text, dtype=torch.float64), atol=1e-6)
    if image_routing == "corpus":
        expected_image = [w(["cat", "car", "dog"], [0, 1, 0])] * 2
    else:
        expected_image = [w(["cat", "car"], [0, 1]), w(["dog"], [0])]
    assert torch.allclose(weights["image"], torch.tensor(expected_image, dtype=torch.float64), atol=1e-6)
    assert summary["votes"] == [2, 1] and summary["image_routing"] == image_routing


def test_calibrated_route_uses_the_temperature_and_no_labels():
    """The evaluator's calibrated weights equal the pure formula on hand-computed squared distances."""
    import dataclasses

    centers = dataclasses.replace(CENTERS, temperature=0.25)
    task = EvalTask("pets", "classification", Path("."), "wds", (), classnames=("cat", "dog", "car"),
                    templates=("a photo of a {c}.",))
    weights, summary = zeroshot.route(task, fake_embed, centers, EnsembleConfig(routing="calibrated"))
    d2 = torch.tensor([[dist(n, 0) ** 2, dist(n, 1) ** 2] for n in ("cat", "dog", "car")], dtype=torch.float64)
    votes = torch.softmax(-d2 / 0.25, dim=1)
    expected = (votes.sum(0) + 0.5) / (3 + 1.0)
    assert weights["task"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert summary["votes"] == [2, 1]
    with pytest.raises(ValueError, match="temperature"):
        zeroshot.route(task, fake_embed, CENTERS, EnsembleConfig(routing="calibrated"))
