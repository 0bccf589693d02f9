"""LossConfig validation, build_loss dispatch, schedules and the trainer-facing hooks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.errors import ConfigError
from training.losses import LossConfig, build_loss, gamma_at_epoch, tau_lr_multiplier
from training.losses.clip import ClipLoss
from training.losses.gcl import GlobalContrastiveLoss
from training.losses.rgcl import IndividualTemperatureGCL


@pytest.mark.parametrize(
    "version, scheme, multiply",
    [
        ("v0", "global_learnable", False),
        ("v1", "global_constant", False),
        ("v2", "individual_learnable", False),
        ("v3", "global_learnable", True),
    ],
)
def test_version_sets_scheme_and_multiply_tau(version, scheme, multiply):
    extra = dict(lr_tau=0.01, lr_tau_scheduler="const") if version == "v2" else {}
    cfg = LossConfig(name="fastclip", version=version, **extra)
    assert (cfg.temperature_scheme, cfg.multiply_tau) == (scheme, multiply)


def test_defaults_without_version():
    cfg = LossConfig()
    assert (cfg.name, cfg.temperature_scheme, cfg.multiply_tau) == ("clip", "global_learnable", False)
    assert (cfg.gamma, cfg.rho, cfg.eps, cfg.temperature, cfg.lr_tau) == (0.8, 8.0, 1e-14, 0.07, -1.0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(name="simclr"), "name: 'simclr' is not one of"),
        (dict(name="fastclip", version="v4"), "version: 'v4' is not one of"),
        (dict(name="gcl", version="v1"), "version: 'v1' needs name='fastclip'"),
        (dict(name="gcl", temperature_scheme="per_sample"), "temperature_scheme: 'per_sample' is not one of"),
        (
            dict(name="fastclip", version="v1", multiply_tau=True),
            "multiply_tau: True contradicts version='v1'",
        ),
        (
            dict(name="fastclip", version="v3", temperature_scheme="global_constant"),
            "temperature_scheme: 'global_constant' contradicts",
        ),
        (
            dict(
                name="gcl",
                temperature_scheme="individual_learnable",
                lr_tau=0.1,
                lr_tau_scheduler="const",
                glofnd="glofnd",
            ),
            "glofnd: 'glofnd' works with global temperature schemes only",
        ),
        (dict(name="gcl", temperature_scheme="individual_learnable"), "lr_tau: individual_learnable"),
        (
            dict(name="gcl", temperature_scheme="individual_learnable", lr_tau=0.1),
            "lr_tau_scheduler: 'cosine'",
        ),
        (dict(name="clip", glofnd="glofnd"), "glofnd: 'glofnd' needs name='gcl' or 'fastclip'"),
        (dict(name="clip", multiply_tau=True), "multiply_tau: True needs name='gcl' or 'fastclip'"),
        (
            dict(
                name="clip", temperature_scheme="individual_learnable", lr_tau=0.1, lr_tau_scheduler="const"
            ),
            "temperature_scheme: 'individual_learnable' needs name='gcl'",
        ),
        (dict(distill_weight=1.5), "distill_weight: must be in [0, 1], got 1.5"),
        (dict(distill_weight=-0.1), "distill_weight: must be in [0, 1]"),
        (dict(distill_mode="kl"), "distill_mode: 'kl' is not one of"),
        (
            dict(name="gcl", glofnd="glofnd", glofnd_start_update=5, glofnd_start_lda=3),
            "glofnd_start_update: must be <=",
        ),
        (dict(gamma=0.0), "gamma: must be in (0, 1]"),
        (dict(temperature=2.0), "temperature: must be in [0.01, 1]"),
        (dict(lr_tau=0.0), "lr_tau: must be finite and != 0"),
        (dict(glofnd_alpha=1.0), "glofnd_alpha: must be in (0, 1)"),
        (dict(table_device="tpu"), "table_device: 'tpu' is not one of"),
        (dict(data_size=-1), "data_size: must be >= 0"),
    ],
)
def test_invalid_settings_are_refused_naming_the_key(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        LossConfig(**kwargs)
    assert fragment in str(info.value)


def test_resolved_config_survives_replace():
    cfg = dataclasses.replace(LossConfig(name="fastclip", version="v3"), data_size=7)
    assert (cfg.data_size, cfg.temperature_scheme, cfg.multiply_tau) == (7, "global_learnable", True)


def test_loss_section_loads_through_the_pipeline_config():
    cfg = load_config(None, ["loss.name=fastclip", "loss.version=v3", "loss.rho=6.5", "loss.data_size=100"])
    assert cfg.loss.multiply_tau is True and cfg.loss.rho == 6.5
    with pytest.raises(ConfigError, match="glofnd_start_update"):
        load_config(None, ["loss.name=gcl", "loss.glofnd=glofnd", "loss.glofnd_start_update=2"])


def test_build_loss_dispatch_and_data_size():
    common = dict(rank=0, world_size=1, device="cpu")
    assert isinstance(build_loss(LossConfig(), **common), ClipLoss)
    assert isinstance(
        build_loss(LossConfig(name="fastclip", version="v3", data_size=5), **common), GlobalContrastiveLoss
    )
    v2 = LossConfig(name="fastclip", version="v2", data_size=5, lr_tau=0.01, lr_tau_scheduler="const")
    assert isinstance(build_loss(v2, **common), IndividualTemperatureGCL)
    with pytest.raises(ValueError, match="data_size: must be > 0 for name='gcl'"):
        build_loss(LossConfig(name="gcl"), **common)
    with pytest.raises(ValueError, match="world_size: 2 needs an initialised"):
        build_loss(LossConfig(), rank=0, world_size=2, device="cpu")


def test_gamma_schedule():
    assert gamma_at_epoch(0, 0.2, "cosine", 10) == 1.0
    assert gamma_at_epoch(5, 0.2, "cosine", 10) == pytest.approx(0.6)
    assert gamma_at_epoch(10, 0.2, "cosine", 10) == 0.2
    assert gamma_at_epoch(0, 0.2, "constant", 10) == 1.0
    assert gamma_at_epoch(1, 0.2, "constant", 10) == 0.2
    loss = build_loss(
        LossConfig(name="gcl", data_size=4, gamma=0.2, gamma_decay_epochs=10),
        rank=0,
        world_size=1,
        device="cpu",
    )
    loss.set_epoch(5)
    assert loss.gamma == pytest.approx(0.6)


def test_tau_lr_multiplier():
    assert tau_lr_multiplier("const", 0, 100, 10, 0.5) == 1.0
    assert tau_lr_multiplier("step_thresh", 0, 100, 10, 0.031) == 1.0
    assert tau_lr_multiplier("step_thresh", 0, 100, 10, 0.03) == pytest.approx(1 / 3)
    assert tau_lr_multiplier("cosine", 4, 100, 10, 0.5) == pytest.approx(0.5)
    assert tau_lr_multiplier("cosine", 10, 110, 10, 0.5) == pytest.approx(1.0)
    assert tau_lr_multiplier("cosine", 60, 110, 10, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_tau_scheduler: 'linear'"):
        tau_lr_multiplier("linear", 0, 1, 0, 0.1)


def test_param_group_overrides():
    v3 = LossConfig(name="fastclip", version="v3", data_size=4, lr_tau=2e-4, lr_tau_scheduler="step_thresh")
    over = build_loss(v3, rank=0, world_size=1, device="cpu").param_group_overrides()["logit_scale"]
    assert over == {
        "lr": 2e-4,
        "scheduler": "step_thresh",
        "frozen": False,
        "weight_decay": 0.0,
        "init": pytest.approx(math.log(1 / 0.07)),
    }
    v1 = LossConfig(name="fastclip", version="v1", data_size=4)
    over = build_loss(v1, rank=0, world_size=1, device="cpu").param_group_overrides()["logit_scale"]
    assert over["frozen"] is True and over["lr"] is None


class WithScale(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(value))


@pytest.mark.parametrize("value, expected", [(5.0, math.log(100)), (-1.0, 0.0), (2.0, 2.0)])
def test_after_optimizer_step_clamps_logit_scale(value, expected):
    loss = build_loss(LossConfig(), rank=0, world_size=1, device="cpu")
    model = WithScale(value)
    loss.after_optimizer_step(model)
    assert model.logit_scale.item() == pytest.approx(expected)
    wrapped = nn.Module()
    wrapped.module = WithScale(value)
    loss.after_optimizer_step(wrapped)
    assert wrapped.module.logit_scale.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="model: Linear has no 'logit_scale'"):
        loss.after_optimizer_step(nn.Linear(2, 2))
