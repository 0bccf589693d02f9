"""Every bad config value fails at load with one line naming the key, the value and the rule."""

from __future__ import annotations

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.errors import ConfigError

BAD_VALUES = [
    ("train.lr=-1", "train.lr: must be > 0, got -1.0"),
    ("train.wd=-1", "train.wd: must be >= 0, got -1.0"),
    ("train.beta1=5", "train.beta1: must be in [0, 1), got 5.0"),
    ("train.beta2=1", "train.beta2: must be in [0, 1), got 1.0"),
    ("train.eps=0", "train.eps: must be > 0"),
    ("train.grad_clip_norm=-1", "train.grad_clip_norm: must be >= 0, got -1.0"),
    ("train.lr=.nan", "train.lr: must be a finite number"),
    ("train.lr=.inf", "train.lr: must be a finite number"),
    ("train.device=gpu0", "train.device: must be auto, cpu, mps, cuda or cuda:<index>, got 'gpu0'"),
    ("train.model=", "train.model: must be non-empty"),
    ("cluster.tol=-1", "cluster.tol: must be >= 0, got -1.0"),
    ("cluster.coarse_n_init=0", "cluster.coarse_n_init: must be >= 1, got 0"),
    ("cluster.sample_size=-3", "cluster.sample_size: must be >= 0, got -3"),
    ("cluster.balance_slack=-2", "cluster.balance_slack: must be in [0, 1), got -2.0"),
    ("cluster.balance_slack=1", "cluster.balance_slack: must be in [0, 1), got 1.0"),
    ("ensemble.batch_size=0", "ensemble.batch_size: must be > 0, got 0"),
    ("ensemble.paper_lambda=0", "ensemble.paper_lambda: must be > 0"),
    ("ensemble.smooth_weight=[5]", "ensemble.smooth_weight: must be two numbers > 0"),
    ("ensemble.evaluators=[]", "ensemble.evaluators: must be a non-empty list"),
    ("assign.chunk_size=0", "assign.chunk_size: must be > 0, got 0"),
    ("assign.chunk_size=-5", "assign.chunk_size: must be > 0, got -5"),
    ("run.workers=-5", "run.workers: must be >= 1, got -5"),
    ("run.seed=-1", "run.seed: must be an integer in [0, 2**32), got -1"),
    ("launcher.nproc_per_node=0", "launcher.nproc_per_node: must be >= 1, got 0"),
    ("embed.max_seq_length=-7", "embed.max_seq_length: must be >= 0, got -7"),
    ('run.name=""', "run.name: must be a non-empty folder name"),
    ("run.name=..", "run.name: must be a non-empty folder name"),
    ("run.name=a/b", "run.name: must be a non-empty folder name"),
    ('run.name="a\\nb"', "run.name: must be a single line (no newline or NUL)"),
    ('launcher.slurm.partition="gpu\\n#SBATCH --x"', "launcher.slurm.partition: must be a single line"),
    ('launcher.slurm.setup=["a\\nb"]', "launcher.slurm.setup[0]: must be a single line"),
    ("prep.csv_separator=ab", "prep.csv_separator: must be one character, got 'ab'"),
    ("prep.caption_keys=[]", "prep.caption_keys: must be a non-empty list"),
    ('data.train="a.tar::"', "data.train: 'a.tar::' has an empty source"),
    ("demo_data.domains=[cats]", "demo_data.domains: ['cats'] not among"),
    ("train.lr=[", "--set train.lr: value '[' is not valid YAML"),
]


@pytest.mark.parametrize("override, expected", BAD_VALUES)
def test_bad_value_is_one_line_naming_key_value_and_rule(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss.distill_weight=0.5"], "loss.distill_weight: 0.5 needs a reference model in train.teacher"),
        (["train.init_from_teacher=true"], "train.init_from_teacher: true needs a reference model in train.teacher"),
        (["train.min_lr=0.1", "train.lr=0.01"], "train.min_lr: 0.1 is above train.lr 0.01"),
        (["train.lock_image_unlocked_groups=2"], "train.lock_image_unlocked_groups: 2 has no effect without train.lock_image"),
        (["train.lock_text_unlocked_layers=1"], "train.lock_text_unlocked_layers: 1 has no effect without train.lock_text"),
        (["train.force_patch_dropout=1.5"], "train.force_patch_dropout: must be -1 (model default) or in [0, 1)"),
        (["cluster.sample_size=10", "cluster.num_fine=64"], "cluster.sample_size: 10 is less than cluster.num_fine 64"),
        (["cluster.num_experts=9", "cluster.num_fine=8"], "cluster.num_experts: must not exceed cluster.num_fine"),
        (["train.seed_steps=9", "train.steps=5"], "train.seed_steps: 9 not in [0, train.steps]"),
    ],
)
def test_conflicting_keys_name_both(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_yaml_syntax_error_is_file_line_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\ncluster: {num_fine: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: YAML syntax error") as err:
        load_config(path)
    assert "\n" not in str(err.value)
    assert cli_main(["status", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:")


def test_missing_extends_target_is_named(tmp_path):
    (tmp_path / "child.yaml").write_text("extends: nowhere.yaml\nrun: {name: c}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "child.yaml")
    text = str(err.value)
    assert "extends: no such file" in text and "nowhere.yaml" in text and "--config" not in text
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(tmp_path / "absent.yaml")


def test_non_utf8_and_non_mapping_configs(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"run: {name: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_shipped_configs_still_load():
    from pathlib import Path

    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)
