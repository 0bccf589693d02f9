"""Loading, overriding, hashing and documenting the pipeline configuration.

The sections themselves (one keyword-only dataclass per top-level YAML key) are in the leaf module
:mod:`pipeline.sections`; they are re-exported here, so ``from pipeline.config import TrainConfig``
works. Command-line overrides use ``--set section.key=value`` (the value is parsed as YAML, so
``--set cluster.num_fine=1024`` gives an int and ``--set train.lr=5e-4`` a float).
``python -m pipeline.config`` prints the reference of every key (docs/config.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.sections import (
    DEMO_DOMAINS,
    AssignConfig,
    ClusterConfig,
    DataConfig,
    DemoDataConfig,
    EmbedConfig,
    EnsembleConfig,
    LauncherConfig,
    LinearEvalConfig,
    LossConfig,
    PipelineConfig,
    PrepConfig,
    RunConfig,
    SlurmConfig,
    SSLConfig,
    TrainConfig,
)

__all__ = [
    "DEMO_DOMAINS", "AssignConfig", "ClusterConfig", "ConfigError", "DataConfig", "DemoDataConfig",
    "EmbedConfig", "EnsembleConfig", "LauncherConfig", "LinearEvalConfig", "LossConfig", "PipelineConfig",
    "PrepConfig", "RunConfig", "SSLConfig", "SlurmConfig", "TrainConfig", "add_config_args", "apply_overrides",
    "config_hash", "config_reference", "diff_keys", "dump_yaml", "from_dict", "load_config", "read_yaml",
    "to_dict", "to_jsonable",
]


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys and types strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        if any(c in value for c in "\n\r\x00"):
            # Strings end up in file names, sbatch lines and printed commands: one line each.
            raise ConfigError(f"{path}: must be a single line (no newline or NUL), got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({_yaml_problem(exc)})") from None
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).split("\n")[0]
    return " ".join(str(problem).split())


def _parse_yaml_file(path: Path) -> Any:
    """``yaml.safe_load`` of a file; errors as one line ``file:line:column: problem``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(exc)}") from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file; ``extends: other.yaml`` (relative to this file) is loaded first."""
    path = Path(path)
    if not path.is_file():
        if _seen:
            raise ConfigError(f"{_seen[-1]}: extends: no such file {path}")
        raise ConfigError(f"--config: no such file {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    data = _parse_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file name, got {parent!r}")
    if parent:
        data = _deep_merge(read_yaml(path.parent / parent, (*_seen, path.resolve())), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(PipelineConfig, data)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (saved beside every stage output)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from any mix of dataclasses, dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def config_hash(obj: Any) -> str:
    """Stable short hash of a config section (or any JSON-able object)."""
    text = json.dumps(to_jsonable(obj), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(old) | set(new))
    changed = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += diff_keys(a, b, path)
        elif a != b:
            changed.append(path)
    return changed


def add_config_args(parser: Any, *, default: str | None = "configs/demo.yaml") -> None:
    """Add ``--config`` and repeatable ``--set KEY=VALUE`` to an argparse parser (every entry point)."""
    if default is None:
        parser.add_argument("--config", required=True, help="pipeline YAML config")
    else:
        parser.add_argument("--config", default=default, help="YAML config (default %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set cluster.num_fine=1024 (repeatable)",
    )


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_reference() -> str:
    """Markdown reference of every section and key with defaults (``python -m pipeline.config``)."""
    lines: list[str] = []
    root = PipelineConfig()
    for section in dataclasses.fields(PipelineConfig):
        _section_reference(section.name, getattr(root, section.name), lines)
    return "\n".join(lines)


def _section_reference(name: str, obj: Any, lines: list[str]) -> None:
    doc = (type(obj).__doc__ or "").strip().split("\n")[0]
    lines += [f"### `{name}` — {doc}", "", "| key | default | meaning |", "|---|---|---|"]
    docs = _field_docs(type(obj))
    nested = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f"{name}.{f.name}", value))
            lines.append(f"| `{f.name}` | (section `{name}.{f.name}`) | {docs.get(f.name, '')} |")
            continue
        shown = json.dumps(to_jsonable(value))
        lines.append(f"| `{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
    lines.append("")
    for sub_name, sub in nested:
        _section_reference(sub_name, sub, lines)


if __name__ == "__main__":
    print(config_reference())
