"""Config for commands that act on an existing run (`python -m qat.export run.dir=DIR`).

Such a command must use the config that trained the run, not today's defaults: it is read from
the checkpoint's `config.json`, then command-line overrides (`key=value`) apply on top.
"""

from __future__ import annotations

import json
import os

from omegaconf import OmegaConf

from qat.config import QATConfig, to_settings
from qat.errors import CheckpointError, ConfigError


def compose_for_run(argv: list[str], phase: str = "quant") -> QATConfig:
    """Schema ← the run's stored `<run.dir>/<phase>/config.json` ← `key=value` overrides."""
    overrides = [a for a in argv if not a.startswith("-")]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise ConfigError(f"cannot parse {bad[0]!r}: arguments are key=value, e.g. run.dir=DIR")
    cli = OmegaConf.from_dotlist(overrides)
    run_dir = OmegaConf.select(cli, "run.dir")
    if not run_dir:
        raise ConfigError("run.dir is required: python -m qat.export run.dir=runs/NAME")
    stored_path = os.path.join(str(run_dir), phase, "config.json")
    if not os.path.isfile(stored_path):
        raise CheckpointError(f"no {phase} checkpoint in {run_dir}: run "
                              f"`python -m qat.train phase={phase} run.dir={run_dir}` first")
    with open(stored_path) as fh:
        stored = json.load(fh)
    schema = OmegaConf.structured(QATConfig)
    try:
        cfg = OmegaConf.merge(schema, stored, cli)
    except Exception as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc
    return to_settings(cfg)
