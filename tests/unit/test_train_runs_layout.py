"""training.runs owns the run layout and names: folders, labels, and the folder printer the Makefile uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from training import runs

REPO = Path(__file__).resolve().parents[2]


def test_run_folders_and_labels(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r"])
    assert runs.train_dir(cfg) == tmp_path / "r" / "train"
    assert runs.run_dir(cfg, "expert_2") == tmp_path / "r" / "train" / "expert_2"
    assert runs.final_path(cfg, runs.SEED) == tmp_path / "r" / "train" / "seed" / "final.pt"
    assert [runs.expert_index(n) for n in ("expert_3", "expert_x", "dense", "seed")] == [3, None, None, None]
    for name, label in [("expert_3", "3"), ("seed", "seed"), ("dense", "dense"), ("random_split_1", "random_split_1")]:
        assert runs.short_label(name) == label and runs.from_label(label) == name


def test_run_folder_printer(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{root: {tmp_path / 'runs'}, name: x}}\n")
    out = subprocess.run(
        [sys.executable, "-m", "training.runs", "--config", str(config), "dense", "expert_0"],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout.split()
    assert out == [str(tmp_path / "runs" / "x" / "train" / n) for n in ("dense", "expert_0")]
    missing = subprocess.run(
        [sys.executable, "-m", "training.runs", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_importing_the_layout_needs_no_torch():
    code = "import sys, training.runs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("name", ["expert_9", "dens"])
def test_unknown_runs_are_refused_in_one_line(tmp_path, name):
    cfg = load_config(None, [f"run.root={tmp_path}"])
    with pytest.raises(Exception, match=f"--expert {name}") as err:
        runs.parse_targets(cfg, name, 2)
    assert "\n" not in str(err.value)
