"""TensorBoard HParams: each run's hyperparameters and final metrics, so sweeps compare in one tab.

`hp.KerasCallback` subclasses tf.keras' Callback and fails with tf_keras models, so qat writes
the summaries itself: `hp.hparams` into `<run.dir>/tb/hparams` with the run dir as trial id, the
final figures as scalars beside it, and `hp.hparams_config` once at a sweep's root. Failed runs
are recorded too (`final/failed` = 1), so a sweep shows what broke, not only what worked.
"""

from __future__ import annotations

import os

from qat.config import QATConfig

METRICS = {
    "final/float_val_accuracy": "float phase validation accuracy",
    "final/quant_val_accuracy": "quant phase validation accuracy (in-framework)",
    "final/tflite_int8_accuracy": "accuracy of the exported int8 file",
    "final/int8_agreement": "argmax agreement, int8 file vs quant model",
    "final/float_step_time_ms": "float phase median train step (ms)",
    "final/quant_step_time_ms": "quant phase median train step (ms)",
    "final/failed": "1 if the run stopped with an error",
}


def hparams_of(settings: QATConfig) -> dict:
    """The swept settings, flattened to the scalar types the HParams plugin accepts."""
    q = settings.quant
    return {
        "phase": settings.phase.name,
        "model": settings.model.name,
        "data": settings.data.name,
        "weight_bits": q.weight_bits,
        "activation_bits": q.activation_bits,
        "bn_bits": q.bn_bits,
        "bn": q.bn,
        "range": q.range,
        "bn_target": q.bn_target,
        "bn_format": q.bn_format,
        "bn_variance": q.bn_variance,
        "freeze_bn_after_steps": -1 if q.freeze_bn_after_steps is None else
        q.freeze_bn_after_steps,
        "quant_learning_rate": q.learning_rate,
        "learning_rate": settings.trainer.learning_rate,
        "optimizer": settings.trainer.optimizer.get("_target_", "").rsplit(".", 1)[-1],
        "schedule": settings.trainer.schedule.name,
        "quant_schedule": q.schedule.name,
        "epochs": settings.trainer.epochs,
        "quant_epochs": q.epochs,
        "batch_size": settings.trainer.batch_size,
        "seed": settings.trainer.seed,
    }


def final_metrics(results: dict, failed: bool) -> dict[str, float]:
    figures = {"final/failed": float(failed)}
    pairs = [("float", "val_accuracy", "final/float_val_accuracy"),
             ("quant", "val_accuracy", "final/quant_val_accuracy"),
             ("export", "tflite_int8_accuracy", "final/tflite_int8_accuracy"),
             ("export", "int8_agreement", "final/int8_agreement"),
             ("float", "step_time_ms", "final/float_step_time_ms"),
             ("quant", "step_time_ms", "final/quant_step_time_ms")]
    for step, key, tag in pairs:
        value = results.get(step, {}).get(key)
        if value is not None:
            figures[tag] = float(value)
    return figures


def log_run(settings: QATConfig, results: dict, failed: bool) -> str:
    """Write this run's HParams session and final metrics; returns the log dir."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    log_dir = os.path.join(settings.run.dir, "tb", "hparams")
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        hp.hparams(hparams_of(settings), trial_id=os.path.abspath(settings.run.dir))
        for tag, value in final_metrics(results, failed).items():
            tf.summary.scalar(tag, value, step=0)
    writer.flush()
    return log_dir


def write_sweep_config(sweep_dir: str, settings: QATConfig) -> None:
    """Declare the columns of the HParams table once, at the root of a sweep."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(sweep_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in hparams_of(settings)],
            metrics=[hp.Metric(tag, display_name=tag.split("/", 1)[1], description=text)
                     for tag, text in METRICS.items()],
        )
    writer.flush()
