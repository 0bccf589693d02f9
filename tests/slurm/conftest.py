"""Tests against a real SLURM cluster (``make test-slurm``); plain ``make test`` never collects them.

``make test-slurm`` starts a single-node cluster (tools/local-slurm.sh), sets
``MODE_SLURM_TESTS=1`` and ``SLURM_CONF``, and runs ``pytest tests/slurm``.
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("MODE_SLURM_TESTS") == "1" else ["test_*.py"]
