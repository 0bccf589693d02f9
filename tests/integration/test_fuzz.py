"""Seeded fuzzing of config values and artifact files: a clear one-line error or a counted skip, always.

* config: random corruptions of every key's value (types, ranges, empty strings, unicode,
  newlines) and random byte flips/truncations of a YAML file → it loads, or one ``ConfigError``
  line naming the key (or the file position);
* files: random truncations and byte flips of a training tar, a caption Parquet, a feature
  ``.npy``, the cluster centres ``.pt``, a training checkpoint ``.pt`` and the manifests → the
  stage succeeds with skips counted, or fails with an expected error type (one line, no
  traceback); pairs of the untouched files, and of the untouched bytes of a damaged tar, are
  never lost.

``FUZZ_SEED`` / ``FUZZ_SCALE`` (environment) reseed or enlarge the run.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import artifacts, runner
from pipeline.config import PipelineConfig, from_dict, load_config, to_dict
from pipeline.errors import ConfigError, CorruptArtifactError, StageError, UnreadableFileError
from pipeline.runner import run_stage
from tests.conftest import overrides, pair_members, write_shard

SEED = int(os.environ.get("FUZZ_SEED", "1234"))
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
EXPECTED = (ConfigError, StageError, FileNotFoundError, CorruptArtifactError, UnreadableFileError)

WEIRD_VALUES = [
    None, True, False, 0, -1, 1, -(2**40), 2**63, 0.5, -0.5, 1e308, float("nan"), float("inf"), "", " ",
    "x", "ünïcødé ☃", "a\nb", "\x00", "../..", "/", "1e-3", [], [1, "a"], {}, {"k": 1}, ["", ""], "::",
]


def _leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def _mutate(rng: random.Random, value):
    choice = rng.random()
    if choice < 0.5:
        return rng.choice(WEIRD_VALUES)
    if isinstance(value, bool):
        return rng.choice([not value, "yes", 1])
    if isinstance(value, (int, float)):
        return rng.choice([-value, value * 10**rng.randint(1, 12), -1, 0, value + 0.5, str(value)])
    if isinstance(value, str):
        return rng.choice(["", value + "\u2603", value * 50, value.upper(), "\t", value + "\r"])
    if isinstance(value, list):
        return rng.choice([[], value + value, [None], [json.dumps(value)]])
    return None


def test_fuzz_config_values():
    rng = random.Random(SEED)
    base = to_dict(PipelineConfig())
    leaves = _leaves(base)
    tried, accepted = 0, 0
    for _ in range(300 * SCALE):
        data = copy.deepcopy(base)
        keys = [rng.choice(leaves) for _ in range(rng.choice([1, 1, 1, 2]))]
        for path in keys:
            node = data
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = _mutate(rng, node[path[-1]])
        tried += 1
        try:
            from_dict(PipelineConfig, data)
            accepted += 1
        except ConfigError as exc:
            text = str(exc)
            assert "\n" not in text and "\r" not in text, (keys, text)
            named = [".".join(p) for p in keys]
            assert any(n in text or n.split(".")[0] in text.split(":")[0] for n in named), (named, text)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"config {keys} → {type(exc).__name__}: {exc}")
    assert tried == 300 * SCALE and 0 < accepted < tried


def test_fuzz_config_file_bytes(tmp_path):
    rng = random.Random(SEED + 1)
    text = open("configs/demo_glofnd_sogclr.yaml", "rb").read()
    base = open("configs/demo.yaml", "rb").read()
    (tmp_path / "demo.yaml").write_bytes(base)
    for i in range(80 * SCALE):
        data = bytearray(text)
        if rng.random() < 0.4:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(bytes(data))
        try:
            load_config(path)
        except ConfigError as exc:
            assert "\n" not in str(exc), str(exc)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{bytes(data)!r} → {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- files


@pytest.fixture
def failures(monkeypatch):
    """Every shard failure the runner sees; each must be an expected error (a clear message)."""
    seen: list[BaseException] = []
    real = runner._log_failure

    def record(name, shard, exc):
        seen.append(exc)
        real(name, shard, exc)

    monkeypatch.setattr(runner, "_log_failure", record)
    return seen


def _pair_ends(path) -> dict[str, int]:
    """Byte offset where each pair's last member's data ends."""
    ends: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            ends[key] = max(ends.get(key, 0), member.offset_data + member.size)
    return ends


def _pair_spans(path) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            lo = spans.get(key, (member.offset, 0))[0]
            spans[key] = (lo, member.offset_data + -(-member.size // 512) * 512)
    return spans


def test_fuzz_training_tars(tmp_path, failures):
    rng = random.Random(SEED + 2)
    data = tmp_path / "data"
    for s in range(2):
        members = []
        for i in range(6):
            members += pair_members(f"{s}_{i}", f"caption {s} {i}", as_json=bool(i % 2))
        write_shard(data / f"{s}.tar", members)
    good = (data / "0.tar").read_bytes()
    victim = data / "1.tar"
    original = victim.read_bytes()
    ends, spans = _pair_ends(victim), _pair_spans(victim)
    for case in range(40 * SCALE):
        buf = bytearray(original)
        if rng.random() < 0.5:
            cut = rng.randrange(len(buf))
            buf = buf[:cut]
            intact = {k for k, end in ends.items() if end <= cut}
        else:
            flips = [rng.randrange(len(buf)) for _ in range(rng.randint(1, 3))]
            for pos in flips:
                buf[pos] ^= 1 << rng.randrange(8)
            intact = {k for k, (lo, hi) in spans.items() if not any(lo <= p < hi for p in flips)}
        victim.write_bytes(bytes(buf))
        root = tmp_path / f"runs{case}"
        cfg = load_config(None, [*overrides(tmp_path, f"{data}/{{0..1}}.tar"), f"run.root={root}"])
        run_stage(cfg, "prep", progress=False)
        keys = set()
        for rel in artifacts.read_manifest(cfg.run_dir / "prep")["outputs"]:
            if rel.startswith("captions/"):
                keys |= set(pq.read_table(cfg.run_dir / "prep" / rel, columns=["key"]).column("key").to_pylist())
        assert {f"0_{i}" for i in range(6)} <= keys  # the untouched shard keeps every pair
        assert intact <= keys, (case, sorted(intact - keys))  # so do the untouched pairs of the damaged one
        counts = artifacts.read_manifest(cfg.run_dir / "prep")["counts"]
        assert counts["out"] == len(keys)
        shutil.rmtree(root)
    victim.write_bytes(original)
    assert (data / "0.tar").read_bytes() == good and not failures


@pytest.fixture
def clustered(tmp_path):
    """prep on real tars, hand-made embed features, a fitted cluster stage."""
    data = tmp_path / "data"
    for s in range(3):
        members = []
        for i in range(12):
            members += pair_members(f"{s}_{i:02d}", f"caption {s} {i}")
        write_shard(data / f"{s}.tar", members)
    cfg = load_config(None, overrides(tmp_path, f"{data}/{{0..2}}.tar", "cluster.num_fine=4",
                                      "cluster.num_experts=2", "cluster.max_iter=5"))
    run_stage(cfg, "prep", progress=False)
    rng = np.random.default_rng(0)
    outputs = []
    for s in range(3):
        n = pq.read_metadata(cfg.run_dir / "prep" / "captions" / f"s0_{s}.parquet").num_rows
        path = cfg.run_dir / "embed" / "features" / f"s0_{s}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.normal(size=(n, 8)).astype(np.float16))
        outputs.append(f"features/s0_{s}.npy")
    artifacts.write_json(cfg.run_dir / "embed" / "manifest.json",
                         {"stage": "embed", "outputs": outputs, "dim": 8, "num_pairs": 36})
    run_stage(cfg, "cluster", progress=False)
    return cfg


def _damage(rng: random.Random, path) -> None:
    buf = bytearray(path.read_bytes())
    if rng.random() < 0.5 or len(buf) < 2:
        buf = buf[: rng.randrange(max(1, len(buf)))]
    else:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    path.write_bytes(bytes(buf))


def test_fuzz_stage_artifacts(clustered, failures):
    """Parquet, .npy, .pt and manifests read by assign: clear errors, and the other shards' pairs kept."""
    cfg = clustered
    rng = random.Random(SEED + 3)
    run = cfg.run_dir
    targets = [
        ("prep/captions/s0_1.parquet", "s0_1"),
        ("embed/features/s0_1.npy", "s0_1"),
        ("cluster/fine_centers.pth", None),
        ("cluster/coarse.pth", None),
        ("cluster/manifest.json", None),
        ("embed/manifest.json", None),
        ("prep/manifest.json", None),
    ]
    backup = run.parent / "backup"
    shutil.copytree(run, backup)
    outcomes: dict[str, int] = {"ok": 0, "error": 0}
    for case in range(60 * SCALE):
        rel, shard = targets[case % len(targets)]
        shutil.rmtree(run)
        shutil.copytree(backup, run)
        _damage(rng, run / rel)
        failures.clear()
        refused = ""
        try:
            run_stage(cfg, "assign", progress=False)
            outcomes["ok"] += 1
        except EXPECTED as exc:
            outcomes["error"] += 1
            refused = str(exc)
            assert "\n" not in str(exc), (rel, str(exc))
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: damaged {rel} → {type(exc).__name__}: {exc}")
        for exc in failures:
            assert isinstance(exc, (*EXPECTED, ValueError)), (rel, type(exc).__name__, str(exc))
        done = {p.stem for p in (run / "assign" / "_done").glob("*.json")} if (run / "assign").is_dir() else set()
        if (rel.startswith("prep/captions") or rel.startswith("embed/features")) and "upstream" in refused:
            # lineage: the damaged file no longer matches its stage's manifest, so assign refuses before
            # writing anything (naming the upstream stage); nothing of the backup's outputs was removed
            assert not (run / "assign").exists() or not done, (case, rel, refused)
        elif rel.startswith("prep/captions") or rel.startswith("embed/features"):
            assert {"s0_0", "s0_2"} <= done, (case, rel, done, refused)  # the untouched shards are kept
            for other in ("s0_0", "s0_2"):
                ids = pq.read_table(run / "assign" / "assign" / f"{other}.parquet").column("pair_id").to_pylist()
                assert len(ids) == 12
    assert outcomes["ok"] + outcomes["error"] == 60 * SCALE and outcomes["error"] > 0


def test_fuzz_checkpoints(tmp_path):
    from training import checkpoint as ckpt

    rng = random.Random(SEED + 4)
    state = {"model": {"w": torch.arange(64.0)}, "step": 3, "rng": [ckpt.rng_state()], "data": {"batches": 1},
             "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    path = ckpt.checkpoint_path(tmp_path, 3)
    ckpt.save_checkpoint(path, state)
    original = path.read_bytes()
    loaded = refused = 0
    for _ in range(60 * SCALE):
        path.write_bytes(original)
        _damage(rng, path)
        try:
            out = ckpt.load_checkpoint(path)
            assert isinstance(out, dict)
            loaded += 1
        except StageError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            refused += 1
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__}: {exc}")
    assert refused > 0


def test_fuzz_npy_files(tmp_path):
    """A damaged feature file is read or refused with one line (numpy alone raises TokenError...)."""
    from pipeline.safeload import load_npy

    rng = random.Random(SEED + 5)
    buf = io.BytesIO()
    np.save(buf, np.ones((5, 4), dtype=np.float16))
    original = buf.getvalue()
    path = tmp_path / "f.npy"
    refused = 0
    for _ in range(60 * SCALE):
        path.write_bytes(original)
        _damage(rng, path)
        try:
            assert load_npy(path, "embed", ndim=2).ndim == 2
        except UnreadableFileError as exc:
            assert "\n" not in str(exc)
            refused += 1
    assert refused > 0
