"""Lineage: which upstream artifacts an output was made from, and commands the user can paste.

Every stage manifest carries a ``lineage`` block::

    {"config": <the stage's hashed config>, "upstream": {<stage>: <lineage digest>}, "outputs": <digest>|None}

and ``lineage_digest`` = digest of that block. ``outputs`` is the content digest of a global
stage's outputs (the cluster centres and the fine→coarse map); sharded stages leave it ``None``
because each of their shards is identified by its own content fingerprint. A downstream stage
records the digests of the upstream manifests it consumed (in every completion record and in its
manifest, with the upstream's ``lineage`` block so a change can be named key by key); a digest that
differs from the upstream's current one makes it stale. The block deliberately leaves out the shard
listing, so adding shards (growth, docs/growth.md) changes no digest.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from pipeline.artifacts import MANIFEST, object_digest, read_manifest
from pipeline.config import diff_keys

_INVOCATION = "_invocation"


def remember_invocation(cfg: Any, config: str | None, overrides: list[str] | None) -> Any:
    """Attach the user's ``--config``/``--set`` to ``cfg`` so suggested commands can repeat them.

    Stored as a plain attribute (not a config field): it is not hashed, dumped or validated.
    """
    object.__setattr__(cfg, _INVOCATION, (config, list(overrides or [])))
    return cfg


def user_args(cfg: Any) -> list[str]:
    """``--config X --set a=b ...`` as the user gave them (empty when unknown)."""
    config, overrides = getattr(cfg, _INVOCATION, (None, []))
    args = ["--config", str(config)] if config else []
    for item in overrides:
        args += ["--set", item]
    return args


def suggest(cfg: Any, command: str) -> str:
    """A command line to paste: ``python -m pipeline <command> --config ... --set ...``."""
    return "`" + shlex.join(["python", "-m", "pipeline", *shlex.split(command), *user_args(cfg)]) + "`"


def lineage_block(config: Any, upstream: dict[str, str], outputs: str | None = None) -> dict[str, Any]:
    """The ``lineage`` block of a manifest (see the module docstring)."""
    return {"config": config, "upstream": dict(sorted(upstream.items())), "outputs": outputs}


def lineage_digest(manifest: dict[str, Any]) -> str:
    """A manifest's lineage digest ('' for manifests written without one, e.g. by hand in tests)."""
    return manifest.get("lineage_digest", "")


def read_lineage(stage_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """``(lineage_digest, lineage block)`` of a finished stage, or None when it has no manifest."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_manifest(stage_dir)  # a corrupt manifest: one CorruptArtifactError line
    if not isinstance(manifest, dict):
        return None
    return lineage_digest(manifest), manifest.get("lineage", {})


def describe_change(saved: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """What differs between a recorded upstream lineage block and the current one, in a few words."""
    if not saved:
        return "it was redone since"
    keys = diff_keys(saved, now)
    config = [k.split(".", 1)[1] for k in keys if k.startswith("config.")]
    parts = []
    if config:
        parts.append(", ".join(config[:6]))
    if "outputs" in keys:
        parts.append("its outputs")
    upstream = [k.split(".", 1)[1] for k in keys if k.startswith("upstream.")]
    if upstream:
        parts.append("its upstream " + ", ".join(upstream))
    return "; ".join(parts) or "it was redone since"


def data_change(consumed: dict[str, str], current: dict[str, str]) -> tuple[list[str], list[str]]:
    """Shards whose fingerprint changed or vanished since they were consumed, and shards added."""
    changed = sorted(s for s, fp in consumed.items() if current.get(s) != fp)
    added = sorted(s for s in current if s not in consumed)
    return changed, added


def digest(obj: Any) -> str:
    """Digest of a lineage block."""
    return object_digest(obj)
