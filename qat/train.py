"""Entry point: `python -m qat.train phase=float|quant|all [overrides]` (and `-m` sweeps).

Thin by design: compose the config (Hydra validates it against the schema before anything else
runs), resolve it, then run the phase steps in order. qat's typed errors are caught here, once,
and printed as one line with a non-zero exit; in a sweep the failed job is recorded and the
sweep goes on (Hydra then exits 1 at the end).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qat.config import QATConfig, register_configs, to_settings
from qat.errors import ConfigError, ExportError, QatError, TrainingError, report_error
from qat.lock import run_lock
from qat.plugins import check_plugins

log = logging.getLogger("qat")
register_configs()


def train(settings: QATConfig, threads: int = 0) -> dict:
    """Run the configured phase steps in a fresh Keras session; returns {step: metrics}."""
    import tensorflow as tf  # imported only once the config is known to be good
    import tf_keras

    from qat import phases
    from qat.data import load_data
    from qat.distribute import is_chief, make_strategy

    tf_keras.backend.clear_session()  # a sweep runs every job in this one process
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    strategy = make_strategy(settings.trainer.strategy, settings.trainer.cpu_replicas)
    _check_runnable(settings)
    data = load_data(settings.data)
    results: dict = {}
    for step in settings.steps:
        if step == "export":  # one process, no collectives: outside the strategy
            if is_chief(strategy):
                from qat.export import export_run

                results["export"] = export_run(settings, data)
            continue
        run_phase = phases.run_float if step == "float" else phases.run_quant
        with strategy.scope():
            results[step] = run_phase(settings, data).metrics
    return results


def _check_runnable(settings: QATConfig) -> None:
    """Settings that would fail mid-run, refused before anything runs or is written."""
    from qat.export import check_exportable
    from qat.recipe import check_optimizer, phase_recipe

    for step in settings.steps:  # every phase's optimizer imports
        if step != "export":
            check_optimizer(phase_recipe(settings, step))
    if "export" in settings.steps:
        check_exportable(settings.quant)
    distributed = settings.trainer.strategy != "default" and "quant" in settings.phase.steps
    if distributed and settings.quant.bn_reestimate_batches:  # set explicitly (null: off here)
        raise ConfigError("quant.bn_reestimate_batches runs eagerly on one device: use "
                          "trainer.strategy=default, or re-estimate in a separate quant run")


def objective(results: dict) -> float:
    """The number a sweeper maximizes: the shipped file's accuracy when there is one."""
    if "export" in results:
        return float(results["export"]["tflite_int8_accuracy"])
    last = results.get("quant") or results.get("float") or {}
    return float(last.get("val_accuracy", float("nan")))


def _sweep_context() -> tuple[str | None, int, int]:
    """(sweep dir or None, job number, TensorFlow threads per job) from Hydra's runtime config."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return None, 0, 0
    if hc.mode != RunMode.MULTIRUN:
        return None, 0, 0
    cores = os.cpu_count() or 1
    jobs = hc.launcher.get("n_jobs") or 1  # the basic launcher runs one job at a time
    if jobs < 1:  # joblib's -1: as many jobs as cores
        jobs = cores
    return str(hc.sweep.dir), int(hc.job.num), max(1, cores // jobs)


def _quiet_logs() -> None:
    for noisy in ("absl", "tensorflow"):  # their INFO lines drown the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # StepTimer waits for the device in on_train_batch_end on purpose; Keras calls that slow.
    logging.getLogger("tensorflow").addFilter(
        lambda record: "is slow compared to the batch time" not in record.getMessage())
    # Export predicts with several freshly built models; each traces once, by design.
    logging.getLogger("tensorflow").addFilter(
        lambda record: "triggered tf.function retracing" not in record.getMessage())


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    _quiet_logs()
    try:
        settings = to_settings(cfg)
    except QatError as exc:
        sys.exit(report_error(exc))
    sweep_dir, job, sweep_threads = _sweep_context()
    results: dict = {}
    from qat.distribute import is_chief_process  # imports TensorFlow: only once config is good

    try:
        # One process per run dir (the chief's lock), held until HParams are written too.
        with run_lock(settings.run.dir, " ".join(sys.argv)) if is_chief_process() else (
                nullcontext()):
            try:
                results = train(settings, settings.trainer.threads or sweep_threads)
            except (TrainingError, ExportError):  # the run happened: show it in HParams
                _record(settings, results, failed=True, sweep_dir=sweep_dir, job=job)
                raise
            _record(settings, results, failed=False, sweep_dir=sweep_dir, job=job)
    except QatError as exc:
        status = report_error(exc)
        if sweep_dir is None:
            sys.exit(status)
        raise
    for step, metrics in results.items():
        log.info("%s: %s", step, metrics)
    return objective(results)


def _record(settings: QATConfig, results: dict, *, failed: bool, sweep_dir: str | None,
            job: int) -> None:
    """HParams for this run (also when it failed, if its run dir exists) and the sweep root."""
    from qat import hparams
    from qat.distribute import is_chief_process

    if not is_chief_process():
        return
    if sweep_dir is not None and job == 0:
        hparams.write_sweep_config(sweep_dir, settings)
    if os.path.isdir(settings.run.dir):
        hparams.log_run(settings, results, failed)


def cli() -> None:
    """Check optional plugins first (clear message, exit 2), then hand over to Hydra."""
    try:
        check_plugins(sys.argv[1:])
    except QatError as exc:
        sys.exit(report_error(exc))
    main()


if __name__ == "__main__":
    cli()
