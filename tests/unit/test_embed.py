"""Unit tests of the embed stage and the text encoder (CPU, bundled all-MiniLM-L6-v2, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import artifacts, runtime
from pipeline.config import load_config
from pipeline.runner import run_stage
from stages import embed, text_encoder
from stages.text_encoder import embed_texts, load_text_model

CAPTIONS = [
    "a red dog running on the beach",
    "cat",
    "two people walking through a busy city street at night under bright neon signs",
    "a bowl of soup",
    "an old wooden boat tied to a pier on a foggy morning",
    "the number seven written in blue ink",
    "a striped texture",
    "green triangle",
    "a child holding a yellow balloon in a park",
]


@pytest.fixture(scope="module")
def encoder() -> text_encoder.TextEncoder:
    return load_text_model("all-MiniLM-L6-v2", device="cpu", pooling="model")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _fake_prep(run_dir: Path, shards: dict[str, list[str | None]]) -> None:
    """A finished prep stage with the given captions (pair ids dense in shard order)."""
    pdir = run_dir / "prep"
    offset, outputs = 0, []
    for name, caps in shards.items():
        table = pa.table(
            {
                "pair_id": pa.array(range(offset, offset + len(caps)), pa.int64()),
                "shard": pa.array([name] * len(caps)),
                "key": pa.array([f"{name}_{i}" for i in range(len(caps))]),
                "caption": pa.array(caps, pa.string()),
                "source": pa.array([0] * len(caps), pa.int16()),
            }
        )
        (pdir / "captions").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, pdir / "captions" / f"{name}.parquet")
        outputs.append(f"captions/{name}.parquet")
        offset += len(caps)
    artifacts.write_json(pdir / "manifest.json", {"stage": "prep", "outputs": outputs, "num_pairs": offset})


def _cfg(tmp_path: Path, *extra: str):
    return load_config(
        None, [f"run.root={tmp_path}", "run.name=u", "run.workers=1", "embed.device=cpu", *extra]
    )


# --------------------------------------------------------------------------- encoder


def test_encode_matches_sentence_transformers_encode_across_sorted_batches(encoder):
    # batch_size=2 makes the length sort reorder rows across many batches.
    ours = encoder.encode(CAPTIONS, batch_size=2, precision="fp32").features
    ref = encoder.module.encode(CAPTIONS, batch_size=64, convert_to_numpy=True)
    assert ours.shape == (len(CAPTIONS), 384)
    assert _cosines(ours, ref).min() >= 0.999


def test_encode_counts_truncation_and_embeds_empty_text(encoder):
    long_text = "word " * 600
    result = encoder.encode(["", long_text, "short"], precision="fp32", max_length=16)
    assert result.truncated == 1
    ref = encoder.module.encode(["", "word " * 14], convert_to_numpy=True)  # 14 words + CLS/SEP = 16 tokens
    assert _cosines(result.features[:2], ref).min() >= 0.999


def test_max_length_beyond_positions_is_refused(encoder):
    with pytest.raises(ValueError, match="max_seq_length"):
        encoder.effective_max_length(100_000)


def test_cls_pooler_is_bert_pooler_output():
    from transformers import AutoModel, AutoTokenizer

    path = text_encoder.resolve_model_path("all-MiniLM-L6-v2")
    enc = load_text_model(str(path), device="cpu", pooling="cls_pooler")
    ours = enc.encode(CAPTIONS[:4], precision="fp32", normalize=False).features
    tok, model = AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        ref = model(**tok(CAPTIONS[:4], padding=True, return_tensors="pt")).pooler_output.numpy()
    assert enc.dim == 384 and not enc.normalizes
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_model_resolution_is_offline_and_explicit(tmp_path):
    assert (text_encoder.resolve_model_path("all-MiniLM-L6-v2") / "modules.json").is_file()
    assert text_encoder.resolve_model_path(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="not a local folder") as err:
        text_encoder.resolve_model_path("no-such-org/no-such-model-xyz")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="pooling"):
        load_text_model("all-MiniLM-L6-v2", device="cpu", pooling="mean")


def test_precision_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == ("bf16" if runtime.cpu_has_native_bf16() else "fp32")
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"


def test_device_comes_from_the_argument():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.resolve_device("auto").type == expected
    assert load_text_model("all-MiniLM-L6-v2", device="cpu").device == torch.device("cpu")


# --------------------------------------------------------------------------- stage functions


def test_hash_leaves_out_runtime_choices(tmp_path):
    base = embed.hash_inputs(_cfg(tmp_path))
    assert embed.hash_inputs(_cfg(tmp_path, "embed.device=cuda", "embed.batch_size=7")) == base
    assert embed.hash_inputs(_cfg(tmp_path, "embed.dtype=float32")) != base
    assert "device" not in base["embed"] and "model" in base["embed"]


def test_list_shards_needs_prep(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m pipeline prep"):
        embed.list_shards(_cfg(tmp_path), tmp_path / "u" / "embed")


def test_cli_reports_missing_prep_in_one_line(tmp_path, capsys):
    from pipeline.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"run: {{root: {tmp_path}, name: u, workers: 1}}\n")
    assert main(["embed", "--config", str(cfg_file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prep: no manifest") and "\n" not in err


def test_stage_rows_align_and_counts(tmp_path, encoder):
    long_text = "a very long caption " * 200
    shards = {"a": CAPTIONS[:4] + [""], "b": [long_text, None, *CAPTIONS[4:]]}
    _fake_prep(tmp_path / "u", shards)
    cfg = _cfg(tmp_path, "embed.precision=fp32")
    summary = run_stage(cfg, "embed", progress=False)
    man = summary["manifest"]
    assert man["outputs"] == ["features/a.npy", "features/b.npy"]
    assert (man["dim"], man["dtype"], man["pooling"], man["normalize"]) == (384, "float16", "model", True)
    assert man["num_pairs"] == 12 and man["empty_captions"] == 2 and man["truncated"] == 1
    sdir = tmp_path / "u" / "embed"
    rec_b = artifacts.read_json(artifacts.done_path(sdir, "b"))
    assert (rec_b["in"], rec_b["out"], rec_b["empty_caption"], rec_b["truncated"]) == (7, 7, 1, 1)
    for name, caps in shards.items():
        feats = np.load(sdir / "features" / f"{name}.npy")
        assert feats.dtype == np.float16 and feats.shape == (len(caps), 384)
        # Each row embedded alone: rows stay with their caption whatever the length sort did.
        alone = np.stack([encoder.module.encode([c or ""], convert_to_numpy=True)[0] for c in caps])
        assert _cosines(feats.astype(np.float32), alone).min() >= 0.999
    assert run_stage(cfg, "embed", progress=False)["ran"] == 0


def test_float32_storage(tmp_path):
    _fake_prep(tmp_path / "u", {"a": CAPTIONS[:3]})
    man = run_stage(_cfg(tmp_path, "embed.dtype=float32"), "embed", progress=False)["manifest"]
    feats = np.load(tmp_path / "u" / "embed" / man["outputs"][0])
    assert man["dtype"] == "float32" and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- embed_texts


def _manifest(**extra) -> dict:
    return {
        "model": "all-MiniLM-L6-v2",
        "model_path": str(text_encoder.resolve_model_path("all-MiniLM-L6-v2")),
        "pooling": "model",
        "dim": 384,
        "normalize": True,
        "config": {"embed": {"precision": "fp32", "max_seq_length": 0}},
        **extra,
    }


def test_embed_texts_template_average_equals_hand_computation(encoder):
    names = ["dog", "sea turtle", "seven"]
    templates = ["a photo of a {}.", "a drawing of the {}.", lambda c: f"itap of my {c}"]
    got = embed_texts(names, model_manifest=_manifest(), templates=templates, device="cpu")
    expected = []
    for name in names:
        texts = [t(name) if callable(t) else t.format(name) for t in templates]
        per = encoder.module.encode(texts, convert_to_numpy=True)
        per = per / np.linalg.norm(per, axis=1, keepdims=True)
        mean = per.mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-4)
    assert not np.allclose(
        got[0], embed_texts(["dog"], model_manifest=_manifest(), device="cpu")[0], atol=1e-3
    )


def test_embed_texts_plain_matches_caption_features(encoder):
    got = embed_texts(CAPTIONS, model_manifest=_manifest(), device="cpu")
    ref = encoder.module.encode(CAPTIONS, convert_to_numpy=True)
    assert _cosines(got, ref).min() >= 0.999


def test_embed_texts_refuses_another_model(tmp_path):
    with pytest.raises(ValueError, match="differs from 'all-MiniLM-L6-v2'") as err:
        embed_texts(["dog"], model_manifest=_manifest(), model="princeton-nlp/sup-simcse-bert-base-uncased")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="differs"):
        embed_texts(["dog"], model_manifest=_manifest(), model=str(tmp_path))
    with pytest.raises(ValueError, match="pooling"):
        embed_texts(["dog"], model_manifest=_manifest(), pooling="cls_pooler")
    with pytest.raises(ValueError, match="384-d"):
        embed_texts(["dog"], model_manifest=_manifest(dim=768), device="cpu")
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        embed_texts(["dog"], model_manifest=_manifest(), templates=["a photo"], device="cpu")
    # The same model by another name is fine.
    same = embed_texts(["dog"], model_manifest=_manifest(), model=_manifest()["model_path"], device="cpu")
    assert same.shape == (1, 384)


def test_embed_texts_reads_a_real_manifest(tmp_path):
    _fake_prep(tmp_path / "u", {"a": CAPTIONS[:3]})
    run_stage(_cfg(tmp_path, "embed.precision=fp32"), "embed", progress=False)
    manifest = json.loads((tmp_path / "u" / "embed" / "manifest.json").read_text())
    feats = np.load(tmp_path / "u" / "embed" / "features" / "a.npy").astype(np.float32)
    got = embed_texts(CAPTIONS[:3], model_manifest=manifest, device="cpu")
    assert _cosines(got, feats).min() >= 0.999
