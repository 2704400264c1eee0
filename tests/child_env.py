"""The environment for a test's child process: the parent's, without our settings.

Tests that start real processes (the CLI, a workload) pass exactly the variables they
mean to: none of ``KERNEL_FALLBACK_*``, ``SGLANG_*``, ``RANK`` or ``LOCAL_RANK`` leaks in
from the shell that runs pytest.
"""

from __future__ import annotations

import os

_OURS = ("KERNEL_FALLBACK_", "SGLANG_", "RANK", "LOCAL_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without the variables kernel_fallback or sglang read, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env.update(extra)
    return env
