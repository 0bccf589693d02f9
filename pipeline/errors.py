"""The framework's error classes, imported by every package (a leaf module: standard library only).

Each is reported as one line by the command-line entry points; the message says what to do.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


class StageError(RuntimeError):
    """A stage cannot run or did not complete; the message says what to do."""


class CorruptArtifactError(ValueError):
    """An artifact (manifest, record) exists but cannot be read back; the message says which."""


class UnreadableFileError(StageError):
    """A torch file that is unsafe (code in the pickle) or unreadable (truncated, corrupt)."""
