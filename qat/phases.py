"""The float and quant phases: functions of a config, built on Keras `fit` and callbacks.

float: build the model with qat's BN (switches off), train, checkpoint to <run.dir>/float/.
quant: rebuild the same model, restore the float checkpoint, wrap it with tfmot's quantizers,
       switch qat's BN into quantized mode, fine-tune, checkpoint to <run.dir>/quant/.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass

import tensorflow as tf
import tf_keras

from qat import callbacks as qcb
from qat.config import QATConfig, settings_to_dict
from qat.data import Data, batches, load_data
from qat.distribute import is_chief, write_dir
from qat.errors import RunDirError, TrainingError
from qat.files import write_json
from qat.layers import batchnorm_layers
from qat.quantize import quantization_plan
from qat.recipe import classification_loss, learning_rate_schedule, make_optimizer, phase_recipe
from qat.reestimate import ReestimateBatchNorm
from qat.runs import (
    build_float_model,
    build_quant_model,
    phase_dir,
    restore_float_weights,
    tb_dir,
)

CHECKPOINT_PREFIX = "ckpt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
DATA_FILE = "data.json"  # input shape, classes (names for data=folder), split sizes
PLAN_FILE = "plan.json"  # quant phase: every layer's quantizers, bits and BN handling
CHECKPOINTS_KEPT = 3
BACKUP_DIR = "backup"  # BackupAndRestore's state for resuming an interrupted phase
# What an interrupted phase must be resumed with: the settings that shape the training itself
# (phase=, run.*, export.* and the progress-bar style may differ between the two commands).
TRAINING_SECTIONS = ("data", "model", "trainer", "quant")
IGNORED_ON_RESUME = ("verbose", "cache")  # how progress shows or data loads, not results

log = logging.getLogger("qat")


@dataclass
class PhaseResult:
    """What a phase returns: its metrics (as written to metrics.json) and the trained model."""

    metrics: dict
    model: tf_keras.Model


def _prepare_phase_dir(directory: str, tb: str, overwrite: bool) -> None:
    """A finished phase is never overwritten unless run.overwrite=true, which starts it over."""
    if overwrite:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(tb, ignore_errors=True)
    elif os.path.exists(os.path.join(directory, METRICS_FILE)):
        raise RunDirError(f"{directory} holds a finished phase: pick another run.name or pass "
                          "run.overwrite=true to replace it")


def _ensure_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write_test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise RunDirError(f"cannot write to {directory} ({exc.strerror}): choose a writable "
                          "run.dir") from exc


def _fit(model: tf_keras.Model, data: Data, settings: QATConfig, phase: str, *, epochs: int,
         extra_callbacks: list | None = None, files: dict | None = None) -> dict:
    """Compile and `fit` with qat's callbacks; an interrupted phase resumes from its backup.
    `files`: {name: JSON-able}, written into the phase dir with its config."""
    trainer = settings.trainer
    chief = is_chief()
    directory, tb = phase_dir(settings, phase), tb_dir(settings, phase)
    backup = os.path.join(directory, BACKUP_DIR)
    steps_per_epoch = trainer.steps_per_epoch or max(1, data.train_examples // trainer.batch_size)
    recipe = phase_recipe(settings, phase)  # before any write: a bad recipe changes nothing
    optimizer = make_optimizer(recipe, learning_rate_schedule(recipe, steps_per_epoch, epochs))
    if phase == "quant" and settings.quant.range == "learned" and not isinstance(
            optimizer, tf_keras.optimizers.SGD):
        log.warning("quant.range=learned with %s: an adaptive optimizer moves each range by "
                    "about the learning rate per step whatever its gradient, so ranges hardly "
                    "train in a short fine-tune; LSQ's gradient scaling assumes SGD "
                    "(+optimizer@quant.optimizer=sgd quant.learning_rate=0.01, README)",
                    type(optimizer).__name__)
    if chief:
        _prepare_phase_dir(directory, tb, settings.run.overwrite)
        _check_resumable(directory, backup, settings)
        _ensure_writable(directory)
        if os.path.isdir(backup):
            log.info("%s phase: resuming the interrupted run from %s", phase, backup)
        write_json(os.path.join(directory, CONFIG_FILE), settings_to_dict(settings))
        for name, content in {DATA_FILE: data.describe(), **(files or {})}.items():
            write_json(os.path.join(directory, name), content)

    model.compile(optimizer=optimizer,
                  loss=classification_loss(trainer.label_smoothing, data.num_classes),
                  metrics=["accuracy"])
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, write_dir(directory),
                                         max_to_keep=CHECKPOINTS_KEPT,
                                         checkpoint_name=CHECKPOINT_PREFIX)

    # With a steps_per_epoch cap Keras keeps one iterator across epochs: it must not run dry.
    train = batches(data.train, trainer.batch_size, shuffle=True, seed=trainer.seed,
                    repeat=trainer.steps_per_epoch is not None, decode=data.decode,
                    augment=settings.data.augment, cache=settings.data.cache,
                    buffer=data.train_buffer, normalization=data.normalization)
    val = batches(data.val, trainer.batch_size, decode=data.decode, cache=settings.data.cache,
                  normalization=data.normalization)
    timer = qcb.StepTimer(write_dir(os.path.join(tb, "train")), trainer.batch_size)
    guard = qcb.StopOnNonFinite()
    callbacks = [
        # Restores model, optimizer, epoch and batch (mid-epoch too) at fit start; deleted once
        # the phase finishes. Its own directory: it must not share one with other checkpoints.
        tf_keras.callbacks.BackupAndRestore(backup, save_freq=trainer.save_every_steps or "epoch"),
        guard,
        timer,
        tf_keras.callbacks.TensorBoard(log_dir=tb, update_freq="epoch", profile_batch=0),
        *(extra_callbacks or []),  # before the checkpoint: BN re-estimation must reach it
        qcb.CheckpointEvery(manager, epoch_var, guard),
    ]
    model.fit(train, validation_data=val, epochs=epochs, steps_per_epoch=trainer.steps_per_epoch,
              callbacks=callbacks, verbose=trainer.verbose)
    if guard.bad_step is not None:
        kept = (f"the last good checkpoint is {manager.latest_checkpoint}"
                if manager.latest_checkpoint else "no checkpoint had been written yet")
        raise TrainingError(f"{phase} phase: loss became NaN/Inf at step {guard.bad_step}; "
                            f"{kept}: lower the learning rate")
    if chief:  # BackupAndRestore removes its checkpoint, not its folder
        shutil.rmtree(backup, ignore_errors=True)
    val_loss, val_accuracy = model.evaluate(val, verbose=0)
    step_ms = timer.median_ms
    metrics = {
        "val_accuracy": float(val_accuracy),
        "val_loss": float(val_loss),
        "step_time_ms": step_ms,
        "examples_per_sec": trainer.batch_size / (step_ms / 1e3) if step_ms == step_ms else None,
        "epochs": epochs,
        "steps": int(model.optimizer.iterations.numpy()),
    }
    if chief:
        write_json(os.path.join(directory, METRICS_FILE), metrics)
    return metrics


def _check_resumable(directory: str, backup: str, settings: QATConfig) -> None:
    """An interrupted phase resumes only under the config that started it."""
    stored_path = os.path.join(directory, CONFIG_FILE)
    if not (os.path.isdir(backup) and os.path.isfile(stored_path)):
        return
    with open(stored_path) as fh:
        stored = json.load(fh)
    current = settings_to_dict(settings)
    changed = []
    for section in TRAINING_SECTIONS:
        for key, value in current[section].items():
            if key not in IGNORED_ON_RESUME and stored.get(section, {}).get(key) != value:
                changed.append(f"{section}.{key}")
    if changed:
        raise RunDirError(f"{directory} holds an interrupted run started with other settings "
                          f"({', '.join(changed[:4])}): rerun the same command to resume, or "
                          "pass run.overwrite=true to start over")


def run_float(settings: QATConfig, data: Data | None = None) -> PhaseResult:
    """Float pretraining with fused BN; every checkpoint holds the BN moving statistics."""
    data = data or load_data(settings.data)
    tf_keras.utils.set_random_seed(settings.trainer.seed)
    model = build_float_model(settings, data)
    metrics = _fit(model, data, settings, "float", epochs=settings.trainer.epochs)
    return PhaseResult(metrics, model)


def run_quant(settings: QATConfig, data: Data | None = None) -> PhaseResult:
    """Restore the float checkpoint, switch quantization on, fine-tune with fake quantization."""
    data = data or load_data(settings.data)
    tf_keras.utils.set_random_seed(settings.trainer.seed)
    float_model = build_float_model(settings, data)
    restore_float_weights(settings, float_model)
    qmodel = build_quant_model(settings, float_model)
    extra = []
    if settings.quant.freeze_bn_after_steps is not None:
        extra.append(qcb.FreezeBatchNormAfter(batchnorm_layers(qmodel),
                                              settings.quant.freeze_bn_after_steps))
    if settings.reestimate_batches:
        def training_images():  # shuffled, not augmented
            return batches(data.train, settings.trainer.batch_size, shuffle=True,
                           seed=settings.trainer.seed + 1, repeat=True, decode=data.decode,
                           buffer=data.train_buffer, normalization=data.normalization)

        extra.append(ReestimateBatchNorm(training_images, settings.reestimate_batches))
    plan = {"layers": quantization_plan(float_model, settings.model_quant())}
    metrics = _fit(qmodel, data, settings, "quant", epochs=settings.quant.epochs,
                   extra_callbacks=extra, files={PLAN_FILE: plan})
    return PhaseResult(metrics, qmodel)
