"""Hydra launcher/sweeper plugins are optional (`pip install 'qat[sweep]'`): check before Hydra.

Without this, selecting a missing plugin ends in Hydra's "Could not find 'hydra/launcher/joblib'"
with a list of what is available, which does not say how to get it.
"""

from __future__ import annotations

import importlib.util

from qat.errors import ConfigError

EXTRA = "pip install 'qat[sweep]'"
# override → the module that provides it
PLUGINS = {
    "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper",
    "hparams_search=quant_optuna": "hydra_plugins.hydra_optuna_sweeper",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_plugins(argv: list[str], installed=_installed) -> None:
    """Raise ConfigError naming the pip extra if an override needs a plugin that is missing."""
    for arg in argv:
        key = arg.lstrip("+~")
        module = PLUGINS.get(key)
        if module and not installed(module):
            raise ConfigError(f"{key} needs a Hydra plugin that is not installed: {EXTRA}")
