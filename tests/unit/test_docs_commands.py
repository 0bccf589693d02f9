"""The commands shown in README.md and docs/*.md run as written.

Every command line in a fenced block (bash, or untagged blocks whose lines start with a command) is
extracted and checked without running the work it describes:

* ``python -m pipeline <cmd> ...``: parses with the CLI's own parser; ``--config`` names a file that
  exists; the config loads with the block's ``--set`` overrides (unknown keys, bad values fail).
* ``torchrun ... -m <module> ...``: the module exists; ``training.main``'s and the stages' arguments parse.
* ``make <target> VAR=...``: the target exists in the Makefile; ``SET=`` overrides load.
* ``tools/<script> <verb>``: the script exists and handles the verb.
* ``python benchmarks/...`` / ``python -m benchmarks...``: the file or module exists.
* Python blocks: compile; every ``from x import y`` resolves; calls of imported functions bind to
  their signatures; open_clip model names are registered (after ``import training.models``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE_VAR = re.compile(r"`([A-Z][A-Z_]*)=('[^'`]*'|\"[^\"`]*\"|[^\s`]+)`")
COMMAND_WORDS = ("python", "make", "torchrun", "sudo", "tools/", "$ ")
PLACEHOLDER = re.compile(r"<[^>]+>|\.\.\.")


def _blocks(path: Path) -> list[tuple[str, int, str]]:
    text = path.read_text()
    return [(m.group(1), text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text)]


def _logical_lines(body: str, first_line: int) -> list[tuple[int, str]]:
    """Backslash continuations joined; comment-only and blank lines dropped."""
    out: list[tuple[int, str]] = []
    pending, start = "", first_line
    for i, line in enumerate(body.splitlines()):
        if not pending:
            start = first_line + i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full and not full.startswith("#"):
            out.append((start, full))
    return out


def _doc_vars(path: Path) -> dict[str, str]:
    """``NAME='value'`` written inline in a doc's prose (e.g. growth.md's ARGS)."""
    found = {}
    for name, value in INLINE_VAR.findall(path.read_text()):
        found[name] = value.strip("'\"")
    return found


def _commands() -> list[tuple[str, list[str], dict[str, str]]]:
    cases = []
    for path in DOCS:
        variables = _doc_vars(path)
        for lang, line0, body in _blocks(path):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for lineno, line in _logical_lines(body, line0):
                where = f"{path.relative_to(ROOT)}:{lineno}"
                words = _split(line, variables)
                if words is None or not words:
                    continue
                if words[0] == "export":
                    continue
                if lang == "" and not line.startswith(COMMAND_WORDS):
                    continue
                cases.append((where, words, dict(variables)))
    return cases


def _split(line: str, variables: dict[str, str]) -> list[str] | None:
    """Shell words with comments dropped, ``$VAR`` expanded, ``[optional]`` brackets opened;
    assignments (``VAR=value`` alone on a line) are recorded in ``variables`` and yield None."""
    if line.startswith("$ "):
        line = line[2:]
    line = re.sub(r"(?<=\s)\[([^\]]*)\]", r"\1", line)
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    if len(words) == 1 and re.fullmatch(r"[A-Z][A-Z_]*=.*", words[0]):
        name, value = words[0].split("=", 1)
        variables[name] = value
        return None
    expanded: list[str] = []
    for w in words:
        if re.fullmatch(r"\$[A-Z][A-Z_]*", w) and w[1:] in variables:
            expanded.extend(shlex.split(variables[w[1:]]))
        else:
            expanded.append(re.sub(r"\$([A-Z][A-Z_]*)", lambda m: variables.get(m.group(1), m.group(0)), w))
    return expanded


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:", text, re.M))


def _check_config(config: str | None, overrides: list[str]) -> None:
    from pipeline.config import load_config

    if config and PLACEHOLDER.search(config):
        return
    if config:
        assert (ROOT / config).is_file(), f"--config {config}: no such file"
    kept = [o for o in overrides if o != "k=v" and not PLACEHOLDER.search(o.split("=", 1)[-1])]
    load_config(ROOT / config if config else None, kept)


def _option_values(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == flag]


def _check_pipeline_cli(args: list[str]) -> None:
    from pipeline.cli import build_parser

    try:
        ns = build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"python -m pipeline {' '.join(args)}: does not parse") from exc
    config = getattr(ns, "config", None)
    _check_config(str(config) if config else None, list(getattr(ns, "overrides", None) or []))


def _check_torchrun(words: list[str]) -> None:
    assert "-m" in words, "torchrun without -m <module>"
    module = words[words.index("-m") + 1]
    args = words[words.index("-m") + 2 :]
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    if module == "training.main":
        from training.main import build_parser

        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"training.main {' '.join(args)}: does not parse") from exc
    config = _option_values(args, "--config")
    _check_config(config[0] if config else None, _option_values(args, "--set"))


def _check_make(words: list[str]) -> None:
    targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
    assignments = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    for target in targets:
        assert target in _make_targets(), f"make {target}: no such target"
    if "SET" in assignments or "CONFIG" in assignments:
        config = assignments.get("CONFIG", "configs/demo.yaml")
        _check_config(config, shlex.split(assignments.get("SET", "")))


def _check_command(words: list[str]) -> None:
    if words[0] == "sudo":
        words = words[1:]
    head = words[0]
    if head == "python" and words[1:3] == ["-m", "pipeline"]:
        _check_pipeline_cli(words[3:])
    elif head == "python" and words[1] == "-m":
        assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
    elif head == "python":
        assert (ROOT / words[1]).is_file(), f"no file {words[1]}"
    elif head == "torchrun":
        _check_torchrun(words)
    elif head == "make":
        _check_make(words)
    elif head.startswith("tools/"):
        script = ROOT / head
        assert script.is_file(), f"no script {head}"
        if len(words) > 1:
            assert re.search(rf"^\s*{re.escape(words[1])}\)", script.read_text(), re.M), (
                f"{head} does not handle '{words[1]}'"
            )
    else:
        raise AssertionError(f"unknown command word {head!r}: teach tests/unit/test_docs_commands.py about it")


CASES = _commands()


def test_docs_have_commands() -> None:
    assert len(CASES) > 30, "the extraction found too few commands: the pattern is broken"


@pytest.mark.parametrize("where,words", [(w, c) for w, c, _ in CASES], ids=[w for w, _, _ in CASES])
def test_doc_command(where: str, words: list[str]) -> None:
    _check_command(words)


def _python_blocks() -> list[tuple[str, str]]:
    return [
        (f"{p.relative_to(ROOT)}:{line}", body)
        for p in DOCS
        for lang, line, body in _blocks(p)
        if lang == "python"
    ]


def _imported_names(tree: ast.Module) -> dict[str, object]:
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = importlib.import_module(alias.name)
    return names


def _check_calls(tree: ast.Module, names: dict[str, object]) -> None:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = _resolve(node.func, names)
        if fn is None or not callable(fn):
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        args = [None] * len(node.args)
        kwargs = {k.arg: None for k in node.keywords if k.arg}
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise AssertionError(f"{ast.unparse(node.func)}(...): {exc}") from exc
        if ast.unparse(node.func).endswith("create_model_and_transforms") and node.args:
            _check_model_name(node.args[0])


def _resolve(func: ast.expr, names: dict[str, object]) -> object | None:
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute):
        base = _resolve(func.value, names)
        return getattr(base, func.attr, None) if base is not None else None
    return None


def _check_model_name(arg: ast.expr) -> None:
    import open_clip

    import training.models  # noqa: F401  (registers the project's model configs)

    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        assert arg.value in open_clip.list_models(), f"open_clip has no model {arg.value!r}"


@pytest.mark.parametrize("where,body", _python_blocks(), ids=[w for w, _ in _python_blocks()])
def test_doc_python(where: str, body: str) -> None:
    tree = ast.parse(body)
    _check_calls(tree, _imported_names(tree))


def test_export_snippet_names_the_demo_model() -> None:
    """docs/training.md's export snippet loads the demo's expert: it must name the demo's model."""
    import yaml

    demo_model = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())["train"]["model"]
    snippet = (ROOT / "docs/training.md").read_text().split("## Exporting and loading", 1)[1]
    assert f'"{demo_model}", pretrained="runs/demo/train/' in snippet
