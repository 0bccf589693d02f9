"""Unit tests of pipeline.runtime: one rule for the launcher's environment, one precision vocabulary."""

from __future__ import annotations

import pickle
import typing

import pytest
import torch

from pipeline import runtime
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.sections import PrecisionName


def test_launcher_env_one_rule_for_torchrun_and_slurm():
    assert runtime.launcher_env({}) == (0, 1, 0)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert runtime.launcher_env(slurm) == (5, 8, 1)
    assert runtime.launcher_env({**slurm, "RANK": "2", "WORLD_SIZE": "4"}) == (2, 4, 0)  # torchrun wins
    assert runtime.launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}) == (0, 1, 0)
    assert runtime.launcher_env({"RANK": "", "WORLD_SIZE": "", **slurm}) == (5, 8, 1)  # empty = unset


def test_precision_vocabulary_and_aliases():
    cpu = torch.device("cpu")
    assert runtime.canonical_precision("amp_bf16") == "bf16"
    assert runtime.canonical_precision("amp") == "fp16"
    assert [runtime.resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "bf16" or torch.cuda.is_available()
    with pytest.raises(ValueError, match="precision: 'fp8' is not one of"):
        runtime.canonical_precision("fp8")
    accepted = set(typing.get_args(PrecisionName))
    assert accepted == set(runtime.PRECISIONS) | set(runtime.PRECISION_ALIASES)
    cfg = load_config(None, ["train.precision=amp_bf16", "embed.precision=amp", "ssl.precision=bf16"])
    assert cfg.train.precision == "amp_bf16"  # kept as written: config hashes do not change


def test_runtime_from_a_config_section():
    cfg = load_config(None, ["embed.device=cpu", "embed.precision=amp_bf16"])
    rt = runtime.for_section(cfg, "embed", progress=False)
    assert (rt.device, rt.precision, rt.progress) == (torch.device("cpu"), "bf16", False)
    assert runtime.for_section(cfg, "prep") == runtime.Runtime()  # no device key: CPU, fp32
    assert pickle.loads(pickle.dumps(rt)) == rt  # travels to spawned pool workers as plain values
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="embed.device: 'cuda:1' requested but CUDA is not available"):
            runtime.for_section(load_config(None, ["embed.device=cuda:1"]), "embed")
