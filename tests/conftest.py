"""Shared fixtures: tiny in-memory data, configs and a subprocess runner for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qat  # noqa: F401  (selects tf_keras before TensorFlow is imported anywhere)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` from the repository like a user would; returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def synthetic_settings(tmp_path):
    """A resolved config on small synthetic data, writing under a temporary run dir."""
    from qat.config import DataConfig, ModelConfig, QATConfig, QuantConfig, RunConfig, TrainerConfig

    def make(**quant) -> QATConfig:
        return QATConfig(
            run=RunConfig(dir=str(tmp_path / "run")),
            data=DataConfig(name="synthetic", image_size=8, train_examples=256, val_examples=128),
            model=ModelConfig(name="convnet", width=8),
            trainer=TrainerConfig(epochs=2, batch_size=32, verbose=0),
            quant=QuantConfig(epochs=1, **quant),
        )

    return make
