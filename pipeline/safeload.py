"""Reading ``torch.save`` files without running code: ``weights_only=True`` and one-line errors.

Every ``.pt``/``.pth`` the project reads back (training checkpoints, pretrained and teacher
weights, cluster centres, ensemble outputs) goes through :func:`torch_load`. A file that holds
anything but tensors and plain Python types (a pickle that could run code on load) is refused
before any of it runs; a truncated or corrupt file is reported as such, naming the file and the
config key or option it came from.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from pipeline.errors import UnreadableFileError

LOAD_ERRORS = (
    RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, AssertionError, IndexError,
)
"""What torch/open_clip raise on truncated, corrupt or mismatched files (beside ``UnpicklingError``)."""



def first_line(exc: BaseException) -> str:
    """The first sentence of an exception message (torch's and pyarrow's run to many lines)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip().split(". ", 1)[0][:200]
    return type(exc).__name__


def refuse_message(what: str, path: str | Path) -> str:
    """The one line reported for a file whose pickle holds more than tensors and plain types."""
    return (
        f"{what}: refused {path}: it holds Python objects other than tensors and plain types "
        f"(a pickle that could run code on load); only weights-only files are read"
    )


def torch_load(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with one-line errors.

    Args:
        path: the file.
        what: the config key or option the file came from (``--resume``, ``train.pretrained``...).

    Raises:
        UnreadableFileError: the file is missing, unsafe, truncated or corrupt.
    """
    import torch

    if not Path(path).is_file():
        raise UnreadableFileError(f"{what}: no such file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnreadableFileError(refuse_message(what, path)) from None
    except LOAD_ERRORS as exc:
        reason = first_line(exc)
        raise UnreadableFileError(f"{what}: cannot read {path} (truncated or corrupt): {reason}") from None


def read_parquet(path: str | Path, what: str, columns: list[str] | None = None) -> Any:
    """``pyarrow.parquet.read_table`` with one-line errors for a damaged file.

    Raises:
        UnreadableFileError: the file is missing, truncated or corrupt, or lacks ``columns``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
        raise UnreadableFileError(f"{what}: cannot read {path} (truncated or corrupt): {first_line(exc)}") from None


def load_npy(path: str | Path, what: str, ndim: int | None = None) -> Any:
    """``numpy.load`` (no pickles) with one-line errors for a damaged file or a wrong shape."""
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a damaged header raises ValueError, TokenError, SyntaxError...
        raise UnreadableFileError(f"{what}: cannot read {path} (truncated or corrupt): {first_line(exc)}") from None
    if ndim is not None and array.ndim != ndim:
        raise UnreadableFileError(f"{what}: {path} holds a {array.ndim}-d array, expected {ndim}-d")
    return array
