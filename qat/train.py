"""Entry point: `python -m qat.train phase=float|quant|all [overrides]`.

Thin by design: compose the config (Hydra validates it against the schema before anything else
runs), resolve it, then run the phase steps in order. qat's typed errors are caught here, once,
and printed as one line with a non-zero exit.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from qat.config import QATConfig, register_configs, to_settings
from qat.errors import QatError

log = logging.getLogger("qat")
register_configs()


def train(settings: QATConfig) -> dict:
    """Run the configured phase steps; returns {step: metrics}."""
    from qat import phases  # TensorFlow is imported only once the config is known to be good
    from qat.data import load_arrays

    arrays = load_arrays(settings.data)
    results: dict = {}
    for step in settings.phase.steps:
        if step == "float":
            results["float"] = phases.run_float(settings, arrays).metrics
        elif step == "quant":
            results["quant"] = phases.run_quant(settings, arrays).metrics
        elif step == "export":
            from qat.export import export_run

            results["export"] = export_run(settings, arrays)
    return results


def objective(results: dict) -> float:
    """The number a sweeper maximizes: the shipped file's accuracy when there is one."""
    if "export" in results:
        return float(results["export"]["tflite_int8_accuracy"])
    last = results.get("quant") or results.get("float") or {}
    return float(last.get("val_accuracy", float("nan")))


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    for noisy in ("absl", "tensorflow"):  # their INFO lines drown the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # StepTimer waits for the device in on_train_batch_end on purpose; Keras calls that slow.
    logging.getLogger("tensorflow").addFilter(
        lambda record: "is slow compared to the batch time" not in record.getMessage())
    try:
        settings = to_settings(cfg)
        results = train(settings)
    except QatError as exc:
        print(f"qat: error: {exc}", file=sys.stderr)
        sys.exit(2)
    for step, metrics in results.items():
        log.info("%s: %s", step, metrics)
    return objective(results)


if __name__ == "__main__":
    main()
