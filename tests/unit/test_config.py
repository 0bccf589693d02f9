from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, config_hash, diff_keys, load_config, to_dict
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_shipped_configs_load():
    assert isinstance(load_config(None), PipelineConfig)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.run.name


def test_override_types_are_parsed():
    cfg = load_config(None, ["cluster.num_fine=1024", "train.lr=5e-4", "embed.normalize=false"])
    assert cfg.cluster.num_fine == 1024 and isinstance(cfg.cluster.num_fine, int)
    assert cfg.train.lr == pytest.approx(5e-4)
    assert cfg.embed.normalize is False


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("cluster.num_fien=3", "cluster.num_fien: unknown key (did you mean 'num_fine'?)"),
        ("cluster.num_fine=abc", "cluster.num_fine: expected an integer"),
        ("cluster.metric=manhattan", "cluster.metric: 'manhattan' is not one of"),
        ("cluster.num_fine=0", "cluster.num_fine: must be > 0"),
        ("train.ooc_ratio=2.0", "train.ooc_ratio"),
        ("nosection.x=1", "nosection: unknown key"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_hash_and_diff():
    a, b = load_config(None), load_config(None, ["prep.verify_images=decode"])
    assert config_hash(a.prep) != config_hash(b.prep)
    assert config_hash(a.embed) == config_hash(b.embed)
    assert diff_keys(to_dict(a), to_dict(b)) == ["prep.verify_images"]


def test_extends_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: base, seed: 3}\ncluster: {num_fine: 16}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrun: {name: child}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.run.name, cfg.run.seed, cfg.cluster.num_fine) == ("child", 3, 16)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_docs_config_reference_is_current():
    from pipeline.config import config_reference

    text = (REPO / "docs" / "config.md").read_text()
    assert config_reference() in text, "regenerate: python -m pipeline.config > docs/config.md (keep the header)"


# Hashes of the demo config as of 8ac0adf: a refactor of the config code must not change them
# (a changed hash makes every existing run stale). A deliberate change of a default or a key
# updates the pin of that section and says so in its commit.
DEMO_HASHES = {
    "run": "394654b8e2448f93", "demo_data": "f39a0f0f189eab38", "data": "4ea6cd17daa75066",
    "prep": "8eddf27ee6346521", "embed": "138ee6bcb310ee38", "cluster": "309fe7cdfa5b5ed8",
    "assign": "cc55631e2242fc57", "train": "88783c29d992869f", "loss": "0b87ccece7702535",
    "ensemble": "3737cfff5903e73e", "launcher": "079e67eab48852a0", "ssl": "2e283c00d8b9d38a",
    "linear_eval": "652f728a5ba76818",
}
DEMO_STAGE_HASHES = {
    "prep": "dcdd6d1106f030be", "embed": "84985f26d17ff9cf", "cluster": "6066ea8d1b78d6fa",
    "assign": "af67e3e71277dc2c",
}


def test_config_identity_hashes_are_stable():
    import importlib

    from pipeline.config import to_jsonable

    cfg = load_config(REPO / "configs" / "demo.yaml")
    sections = {name: config_hash(to_jsonable(getattr(cfg, name))) for name in DEMO_HASHES}
    assert sections == DEMO_HASHES
    stages = {name: config_hash(importlib.import_module(f"stages.{name}").hash_inputs(cfg)) for name in DEMO_STAGE_HASHES}
    assert stages == DEMO_STAGE_HASHES
