"""Nothing the project reads back with ``torch.load`` runs code: one malicious pickle per entry point.

Each test writes a ``.pt`` whose unpickling would create a marker file, hands it to one entry
point (``--resume``, ``train.pretrained``, ``train.teacher``, the cluster centres, the ensemble's
expert weights and saved outputs) and checks that it is refused with one line and that the
marker never appears.
"""

from __future__ import annotations

import pathlib
import random

import numpy as np
import pytest
import torch

from pipeline import artifacts
from pipeline.config import load_config
from pipeline.errors import ConfigError, StageError, UnreadableFileError
from pipeline.safeload import torch_load
from training import checkpoint as ckpt


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def evil_file(path: pathlib.Path, marker: pathlib.Path, wrap: str | None = None) -> pathlib.Path:
    """A torch file holding the payload (optionally under a key, like a real checkpoint)."""
    obj = {"model": {}, "step": 1, wrap: _Payload(marker)} if wrap else _Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_torch_load_refuses_a_pickle_with_code(tmp_path):
    marker = tmp_path / "ran"
    path = evil_file(tmp_path / "x.pt", marker)
    with pytest.raises(UnreadableFileError, match="refused") as info:
        torch_load(path, "somewhere")
    assert one_line(info.value).startswith("somewhere: refused")
    assert not marker.exists()


def test_resume_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    path = evil_file(tmp_path / "step_3.pt", marker, wrap="rng")
    with pytest.raises(StageError, match=r"^--resume: refused"):
        ckpt.load_checkpoint(path)


def test_resume_choose_restore_refuses(tmp_path):
    from pipeline.runtime import Runtime
    from training.loop import RunSpec
    from training.main import choose_restore

    marker = tmp_path / "ran"
    path = evil_file(tmp_path / "evil.pt", marker, wrap="rng")
    spec = RunSpec("expert_0", 0, tmp_path / "expert_0", 0, 4)
    with pytest.raises(StageError, match="--resume: refused"):
        choose_restore(spec, Runtime(), str(path), {})
    assert not marker.exists()


def test_pretrained_refuses_a_malicious_file(tmp_path):
    from training.models import create_model

    marker = tmp_path / "ran"
    path = evil_file(tmp_path / "pretrained.pt", marker)
    with pytest.raises(ConfigError, match=r"^train\.pretrained: refused") as info:
        create_model("mode-micro-vit", str(path))
    one_line(info.value)
    assert not marker.exists()


def test_teacher_refuses_a_malicious_file_and_names_a_wrong_architecture(tmp_path):
    from training.models import create_model, create_teacher

    marker = tmp_path / "ran"
    path = evil_file(tmp_path / "teacher.pt", marker)
    with pytest.raises(ConfigError, match=r"^train\.teacher: refused"):
        create_teacher(f"mode-micro-vit:{path}", "cpu")
    assert not marker.exists()
    other = tmp_path / "rn.pt"
    torch.save(create_model("mode-tiny-rn").model.state_dict(), other)
    with pytest.raises(ConfigError, match=r"^train\.teacher: .*rn\.pt holds another architecture \(ResNet stem width .*\) than 'mode-micro-vit' \(ViT width 32") as info:
        create_teacher(f"mode-micro-vit:{other}", "cpu")
    one_line(info.value)


def test_cluster_centres_refuse_a_malicious_file(tmp_path):
    from stages.cluster import load_centers

    cfg = load_config("configs/demo.yaml", [f"run.root={tmp_path}"])
    cdir = cfg.run_dir / "cluster"
    artifacts.write_json(cdir / "manifest.json", {"stage": "cluster"})
    marker = tmp_path / "ran"
    evil_file(cdir / "fine_centers.pth", marker)
    torch.save({"coarse": torch.zeros(2, 3), "assign": torch.zeros(4, dtype=torch.long)}, cdir / "coarse.pth")
    with pytest.raises(StageError, match=r"^cluster: refused") as info:
        load_centers(cfg)
    one_line(info.value)
    assert not marker.exists()


def test_ensemble_refuses_malicious_weights_and_outputs(tmp_path):
    from ensemble.stage import _cached_meta, load_outputs
    from training.evaluation.clip import load_clip

    marker = tmp_path / "ran"
    path = evil_file(tmp_path / "final.pt", marker)
    with pytest.raises(StageError, match=r"^ensemble: refused") as info:
        load_clip("mode-micro-vit", path, torch.device("cpu"))
    one_line(info.value)
    with pytest.raises(Exception) as raised:
        load_outputs(path)
    assert "Weights only load failed" in str(raised.value) or "refused" in str(raised.value)
    assert _cached_meta(path, {"model": "x"}) is None  # an unreadable cache is recomputed
    assert not marker.exists()


def test_checkpoint_rng_and_state_load_weights_only(tmp_path):
    """A real checkpoint (RNG states, data position) holds only tensors and plain types."""
    state = {"model": {"w": torch.ones(2)}, "step": 3, "rng": [ckpt.rng_state()], "data": {"batches": 2}}
    path = ckpt.checkpoint_path(tmp_path, 3)
    ckpt.save_checkpoint(path, state)
    loaded = torch.load(path, weights_only=True)
    a = (torch.rand(2), np.random.rand(), np.random.randn(), random.random())
    ckpt.set_rng_state(loaded["rng"][0])
    b = (torch.rand(2), np.random.rand(), np.random.randn(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert ckpt.load_checkpoint(path)["step"] == 3
