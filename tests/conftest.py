"""Shared fixtures: tiny in-memory data, configs and a subprocess runner for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import qat  # noqa: F401  (selects tf_keras before TensorFlow is imported anywhere)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` from the repository like a user would; returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
