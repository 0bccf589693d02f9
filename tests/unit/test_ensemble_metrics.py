"""Evaluator metrics and output combination on tiny hand-made examples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ensemble.evaluators import retrieval, zeroshot
from ensemble.scoring import score_task
from ensemble.systems import systems_of
from training.evaluation import retrieval as ev_retrieval
from training.evaluation import zeroshot as ev_zeroshot
from training.evaluation.tasks import EvalTask


def test_classification_metrics_by_hand():
    # 6 classes; ranks of the target: 1st, 3rd, 6th, 1st, 1st
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0, 0.0, 0.0],  # target 0, top-1
            [0.5, 0.9, 0.1, 0.7, 0.0, 0.2],  # target 0, 3rd → top-5 only
            [0.5, 0.0, 0.9, 0.7, 0.3, 0.2],  # target 1, last → miss
            [0.1, 0.2, 0.8, 0.3, 0.0, 0.0],  # target 2, top-1
            [0.0, 0.0, 0.5, 0.4, 0.0, 0.0],  # target 2, top-1
        ]
    )
    targets = torch.tensor([0, 0, 1, 2, 2])
    m = dict(zeroshot.metrics({"logits": logits, "targets": targets}))
    assert m["acc1"] == pytest.approx(3 / 5)
    assert m["acc5"] == pytest.approx(4 / 5)
    # per-class recall: class 0 → 1/2, class 1 → 0/1, class 2 → 2/2
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)


def test_acc5_is_nan_below_five_classes():
    m = ev_zeroshot.classification_metrics(torch.tensor([[0.2, 0.1], [0.3, 0.4]]), torch.tensor([0, 0]))
    assert m["acc1"] == pytest.approx(0.5) and math.isnan(m["acc5"])


def test_weighted_logits_can_flip_the_prediction():
    a = {"logits": torch.tensor([[0.9, 0.1]]), "targets": torch.tensor([1])}
    b = {"logits": torch.tensor([[0.2, 0.6]]), "targets": torch.tensor([1])}
    # uniform: [0.55, 0.35] → class 0 (wrong); [0.25, 0.75]: [0.375, 0.475] → class 1 (right)
    assert zeroshot.combined_metrics([a, b], {"task": torch.tensor([0.5, 0.5])})["acc1"] == 0.0
    assert zeroshot.combined_metrics([a, b], {"task": torch.tensor([0.25, 0.75])})["acc1"] == 1.0
    assert ev_zeroshot.combine([a, b], torch.tensor([0.25, 0.75]))[0].tolist() == pytest.approx([0.375, 0.475])


def _retrieval_outputs(similarity: list[list[float]], text_image: list[int]) -> dict:
    """Image features = identity, so caption t's similarity row is its own feature vector."""
    sim = torch.tensor(similarity)
    return {"image_features": torch.eye(sim.shape[1]), "text_features": sim, "text_image": torch.tensor(text_image)}


# captions × images; captions 0, 1 describe image 0, caption 2 image 1, caption 3 image 2
SIM_A = [[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.4, 0.3, 0.1], [0.0, 0.1, 0.8]]
TEXT_IMAGE = [0, 0, 1, 2]


def test_retrieval_recalls_by_hand_with_several_captions_per_image():
    out = _retrieval_outputs(SIM_A, TEXT_IMAGE)
    m = ev_retrieval.retrieval_metrics([out], torch.ones(4, 1), torch.ones(3, 1), ks=(1, 2, 10))
    # text→image: ranks of the right image: 1, 3, 2, 1
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert m["image_retrieval_recall@10"] == 1.0
    # image→text: image 0's best caption is its own; image 1's top is caption 1 (image 0's), then
    # caption 2 (its own); image 2's top is caption 3
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0
    default = dict(retrieval.metrics(out))
    assert set(default) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def test_retrieval_per_query_weights_pick_rows():
    a = _retrieval_outputs(SIM_A, TEXT_IMAGE)
    sim_b = [[0.0, 0.9, 0.1], [0.9, 0.0, 0.0], [0.9, 0.0, 0.0], [0.9, 0.0, 0.0]]
    b = _retrieval_outputs(sim_b, TEXT_IMAGE)
    # caption 1 uses expert b (hits image 0 first); the others use expert a
    text_w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    image_w = torch.tensor([[1.0, 0.0]] * 3)
    m = ev_retrieval.retrieval_metrics([a, b], text_w, image_w, ks=(1,))
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_identical_experts_ensemble_equals_the_single_expert():
    torch.manual_seed(0)
    cls = {"logits": torch.randn(20, 7), "targets": torch.randint(0, 7, (20,))}
    ret = _retrieval_outputs(torch.randn(9, 5).tolist(), [0, 0, 1, 2, 2, 3, 4, 4, 4])
    for evaluator, out, weights in (
        (zeroshot, cls, {"task": torch.tensor([0.7, 0.2, 0.1])}),
        (retrieval, ret, {"text": torch.softmax(torch.randn(9, 3), 1), "image": torch.softmax(torch.randn(5, 3), 1)}),
    ):
        outputs = {"expert_0": out, "expert_1": out, "expert_2": out, "seed": out, "dense": out}
        systems = systems_of(3, {"dense": ["dense"]}, has_seed=True)
        task = EvalTask("t", evaluator.TASK_KIND, Path("."), "wds", (), classnames=tuple("abcdefg"))
        scores = score_task(task, evaluator, outputs, weights, {"paper": weights}, systems)
        single = dict(evaluator.metrics(out))
        for name in ("expert-1", "all_unit", "ensemble", "seed", "dense"):
            for metric, value in single.items():
                assert scores.metrics[name][metric] == pytest.approx(value, nan_ok=True), (name, metric)
        for row, items in zip(scores.rows, scores.items, strict=True):
            assert row["expert-max"] == row["expert-1"] and "ensemble@paper" in items


def test_report_rows_are_percent_with_expert_max():
    task = EvalTask("digits", "classification", Path("."), "wds", (), classnames=("a", "b", "c"))
    targets = torch.tensor([0, 1, 2, 0])
    good = {"logits": torch.eye(3)[targets], "targets": targets}  # all right
    half = {"logits": torch.eye(3)[torch.tensor([0, 0, 0, 0])], "targets": targets}  # 2 of 4
    outputs = {"expert_0": half, "expert_1": good}
    systems = systems_of(2, {}, has_seed=False)
    scores = score_task(task, zeroshot, outputs, {"task": torch.tensor([0.9, 0.1])}, {}, systems)
    (row,) = scores.rows
    assert row["expert-0"] == 50.0 and row["expert-1"] == 100.0 and row["expert-max"] == 100.0
    assert row["ensemble"] == 50.0 and row["dataset"] == "digits" and row["num_classes"] == 3
    assert scores.items[0]["ensemble"].values.tolist() == [1.0, 0.0, 0.0, 1.0]
