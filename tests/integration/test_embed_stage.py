"""The embed stage on a tiny prep output: run, rerun, resume, refuse, and torchrun with 2 processes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import artifacts
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.runner import run_stage
from tests.conftest import write_shard

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SHARD_TEXTS = [
    ["a red dog on the beach", "a small grey cat asleep on a sofa", "the digit four drawn in chalk"],
    ["a blue car parked near a tall tree", "two people walking in the city at night " * 40],
    ["a striped orange texture", "a green triangle on white", "the word harbor in bold letters", "a boat"],
]


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _write_tars(folder: Path) -> None:
    jpg = _jpeg()
    for i, texts in enumerate(SHARD_TEXTS):
        members = []
        for j, text in enumerate(texts):
            members += [(f"k{i}_{j}.json", json.dumps({"texts": [text]}).encode()), (f"k{i}_{j}.jpg", jpg)]
        write_shard(folder / f"{i}.tar", members)


def _overrides(root: Path, name: str) -> list[str]:
    return [
        f"run.root={root}",
        f"run.name={name}",
        f"data.train={root}/data/{{0..2}}.tar",
        "run.workers=1",
        "embed.precision=fp32",
        "embed.device=cpu",
    ]


@pytest.fixture(scope="module")
def prepped(tmp_path_factory) -> Path:
    """Tars → prep (run 'one'); returns the runs root."""
    root = tmp_path_factory.mktemp("embed_stage")
    (root / "data").mkdir()
    _write_tars(root / "data")
    run_stage(load_config(None, _overrides(root, "one")), "prep", progress=False)
    return root


def _features(run_dir: Path) -> np.ndarray:
    manifest = artifacts.read_manifest(run_dir / "embed")
    return np.concatenate([np.load(run_dir / "embed" / rel) for rel in manifest["outputs"]])


def test_run_rerun_resume_and_refuse(prepped):
    cfg = load_config(None, _overrides(prepped, "one"))
    first = run_stage(cfg, "embed", progress=False)
    man = first["manifest"]
    assert first["ran"] == 3 and man["num_pairs"] == 9 and man["dim"] == 384
    assert man["truncated"] == 1 and man["empty_captions"] == 0
    assert man["model"] == "all-MiniLM-L6-v2" and Path(man["model_path"]).is_dir()

    # Rows align with pair ids: row pair_id of the concatenation is that pair's caption.
    run_dir = prepped / "one"
    captions = pq.read_table(run_dir / "prep" / "captions").sort_by("pair_id")
    assert captions.column("pair_id").to_pylist() == list(range(9))
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(man["model_path"], device="cpu")
    ref = model.encode(captions.column("caption").to_pylist(), convert_to_numpy=True)
    feats = _features(run_dir).astype(np.float32)
    assert (np.sum(feats * ref, axis=1) >= 0.999).all()

    assert run_stage(cfg, "embed", progress=False)["ran"] == 0

    # A lost shard (record and output) is the only one redone.
    sdir = run_dir / "embed"
    victim = Path(man["outputs"][1]).stem
    artifacts.done_path(sdir, victim).unlink()
    (sdir / man["outputs"][1]).unlink()
    (sdir / "manifest.json").unlink()
    resumed = run_stage(cfg, "embed", progress=False)
    assert (resumed["ran"], resumed["skipped"]) == (1, 2)
    np.testing.assert_array_equal(_features(run_dir).astype(np.float32), feats)

    # Runtime choices do not make outputs stale; a changed storage dtype does.
    assert (
        run_stage(load_config(None, [*_overrides(prepped, "one"), "embed.batch_size=2"]), "embed")["ran"] == 0
    )
    with pytest.raises(StageError, match="embed.dtype"):
        run_stage(
            load_config(None, [*_overrides(prepped, "one"), "embed.dtype=float32"]), "embed", progress=False
        )


def test_torchrun_two_processes_gives_the_same_features(prepped):
    one = prepped / "one"
    if not (one / "embed" / "manifest.json").is_file():
        run_stage(load_config(None, _overrides(prepped, "one")), "embed", progress=False)
    two = prepped / "two"
    shutil.copytree(one / "prep", two / "prep")
    # prep ran with the defaults: keep demo.yaml's prep keys equal to them, or embed refuses (lineage).
    sets = [arg for o in [*_overrides(prepped, "two"), "prep.label_field=''"] for arg in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    config = str(REPO / "configs" / "demo.yaml")
    # --standalone: a free local rendezvous port, so parallel test runs do not collide.
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "stages.embed",
        "--config",
        config,
        *sets,
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: ran 2 shard(s)" in proc.stdout and "rank 1/2: ran 1 shard(s)" in proc.stdout
    # the last line says what all ranks did, not rank 0's final pass ("ran 0 shard(s), skipped 3")
    assert proc.stdout.strip().splitlines()[-1].startswith("embed: 2 rank(s) ran 3 shard(s) in all, 0 already done")
    manifest = artifacts.read_manifest(two / "embed")
    assert manifest["num_pairs"] == 9 and manifest["counts"]["out"] == 9
    np.testing.assert_allclose(
        _features(two).astype(np.float32), _features(one).astype(np.float32), atol=2e-3
    )
