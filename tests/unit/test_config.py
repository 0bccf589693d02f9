from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, config_hash, diff_keys, load_config, to_dict

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
