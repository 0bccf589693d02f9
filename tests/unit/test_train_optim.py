"""AdamW parameter groups, the learning-rate schedules and mixed-precision resolution."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.runtime import cpu_has_native_bf16
from training.loop import resolve_precision
from training.losses import tau_lr_multiplier
from training.models import create_model, parse_teacher
from training.optim import (
    DECAY,
    LOGIT_SCALE,
    NO_DECAY,
    ScaleRule,
    apply_hyperparameters,
    build_optimizer,
    cosine_lr,
    set_learning_rates,
)


@pytest.fixture(scope="module")
def model():
    return create_model("mode-micro-vit").model


def _groups(optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_no_weight_decay_on_gains_biases_and_logit_scale(model):
    cfg = TrainConfig(wd=0.2)
    groups = _groups(build_optimizer(model, cfg, ScaleRule(None, "cosine", False)))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for p in groups[DECAY]["params"]]
    free = [names[id(p)] for p in groups[NO_DECAY]["params"]]
    assert groups[DECAY]["weight_decay"] == 0.2 and groups[NO_DECAY]["weight_decay"] == 0.0
    assert all(".bias" not in n and "ln_" not in n for n in decayed)
    assert "visual.conv1.weight" in decayed and "token_embedding.weight" in decayed
    assert "ln_final.weight" in free and "visual.ln_post.bias" in free and "positional_embedding" not in free
    assert [names[id(p)] for p in groups[LOGIT_SCALE]["params"]] == ["logit_scale"]
    assert groups[LOGIT_SCALE]["weight_decay"] == 0.0
    assert len(decayed) + len(free) + 1 == sum(1 for _ in model.parameters())


def test_frozen_logit_scale_is_left_out(model):
    optimizer = build_optimizer(model, TrainConfig(), ScaleRule(None, "cosine", frozen=True))
    assert LOGIT_SCALE not in _groups(optimizer) and not model.logit_scale.requires_grad
    model.logit_scale.requires_grad_(True)


def test_cosine_schedule_with_warmup_and_floor():
    assert cosine_lr(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert cosine_lr(60, 1.0, 10, 110, min_lr=0.2) == pytest.approx(0.6)
    assert cosine_lr(110, 1.0, 10, 110, min_lr=0.2) == pytest.approx(0.2)
    assert cosine_lr(10, 1.0, 10, 110) == pytest.approx(1.0)


def test_logit_scale_group_follows_its_own_rule(model):
    cfg = TrainConfig(lr=1e-3, warmup=4, steps=40, seed_steps=20)
    follow = build_optimizer(model, cfg, ScaleRule(None, "cosine", False))
    rates = set_learning_rates(follow, cfg, ScaleRule(None, "cosine", False), 20, tau=0.07)
    assert rates[LOGIT_SCALE] == rates[DECAY] == pytest.approx(cosine_lr(20, 1e-3, 4, 40))
    rule = ScaleRule(2e-4, "step_thresh", False)
    own = build_optimizer(model, cfg, rule)
    assert set_learning_rates(own, cfg, rule, 20, tau=0.02)[LOGIT_SCALE] == pytest.approx(
        2e-4 * tau_lr_multiplier("step_thresh", 20, 40, 4, 0.02)
    )
    assert set_learning_rates(own, cfg, rule, 20, tau=0.05)[LOGIT_SCALE] == pytest.approx(2e-4)


def test_hyperparameters_are_reapplied_after_loading(model):
    cfg = TrainConfig(wd=0.1, beta2=0.98)
    optimizer = build_optimizer(model, cfg, ScaleRule(None, "cosine", False))
    state = optimizer.state_dict()
    other = build_optimizer(model, TrainConfig(wd=0.5, beta2=0.9), ScaleRule(None, "cosine", False))
    other.load_state_dict(state)
    apply_hyperparameters(other, TrainConfig(wd=0.5, beta2=0.9))
    assert _groups(other)[DECAY]["weight_decay"] == 0.5 and _groups(other)[NO_DECAY]["betas"] == (0.9, 0.9)


def test_precision_policies():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu).dtype is None
    assert resolve_precision("amp_bf16", cpu).dtype == torch.bfloat16
    amp = resolve_precision("amp", cpu)
    assert amp.dtype == torch.bfloat16 and not amp.needs_scaler  # fp16 + scaler only on GPU
    assert resolve_precision("amp", torch.device("cuda")).needs_scaler
    assert resolve_precision("auto", torch.device("cuda")).dtype == torch.bfloat16
    assert resolve_precision("auto", cpu).dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    with resolve_precision("amp_bf16", cpu).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_train_config_validation_and_teacher_spec():
    with pytest.raises(ConfigError, match="train.data_split"):
        from pipeline.config import load_config

        load_config(None, ["train.data_split=rows"])
    with pytest.raises(ConfigError, match="train.teacher"):
        TrainConfig(teacher="ViT-B-32")
    with pytest.raises(ConfigError, match="init_from_teacher"):
        TrainConfig(init_from_teacher=True)
    assert parse_teacher("mode-tiny-vit:/runs/x/final.pt") == ("mode-tiny-vit", "/runs/x/final.pt")
    with pytest.raises(ValueError, match="train.teacher"):
        parse_teacher(":/x.pt")


def test_reference_lr_and_wd_multipliers_scale_the_model_groups(model):
    base, scaled = TrainConfig(), TrainConfig(lr_multiplier=3.0, wd_multiplier=3.0, min_lr=1e-4)
    rule = ScaleRule(None, "cosine", False)
    plain, opt = build_optimizer(model, base, rule), build_optimizer(model, scaled, rule)
    assert _groups(opt)[DECAY]["weight_decay"] == pytest.approx(3 * _groups(plain)[DECAY]["weight_decay"])
    assert _groups(opt)[NO_DECAY]["weight_decay"] == 0.0
    rates = set_learning_rates(opt, scaled, rule, 100, 0.07)
    assert rates[DECAY] == pytest.approx(3 * cosine_lr(100, scaled.lr, scaled.warmup, scaled.steps, scaled.min_lr))
    apply_hyperparameters(opt, scaled)
    assert _groups(opt)[DECAY]["weight_decay"] == pytest.approx(0.3)
    assert set_learning_rates(opt, scaled, rule, scaled.steps, 0.07)[DECAY] == pytest.approx(3e-4)  # min_lr x 3
