"""The training recipe of a phase: optimizer (Hydra `_target_`), learning-rate schedule, loss.

The optimizer is whatever `trainer.optimizer` / `quant.optimizer` instantiate (any tf_keras
optimizer, or the user's own), given the schedule as its `learning_rate`. Schedules are named
(constant, cosine, step) rather than instantiated: their lengths are in epochs, which only
become steps once the data is known, and a Keras schedule wants steps. Every schedule is a
Keras `LearningRateSchedule`, so Keras' TensorBoard callback logs `epoch_learning_rate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras

from qat.config import ScheduleConfig
from qat.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """One phase's recipe, with the keys it came from (for error messages)."""

    where: str  # "trainer" or "quant"
    optimizer: dict[str, Any]
    learning_rate: float
    schedule: ScheduleConfig


def phase_recipe(settings, phase: str) -> Recipe:
    """The float phase's recipe is trainer.*; the quant phase's is quant.*, its optimizer
    defaulting to the trainer's."""
    trainer, quant = settings.trainer, settings.quant
    if phase == "float":
        return Recipe("trainer", trainer.optimizer, trainer.learning_rate, trainer.schedule)
    return Recipe("quant", quant.optimizer or trainer.optimizer, quant.learning_rate,
                  quant.schedule)


def check_optimizer(recipe: Recipe) -> None:
    """Fail before anything is written when the optimizer target does not import."""
    from hydra._internal.utils import _locate

    target = recipe.optimizer.get("_target_")
    key = f"{recipe.where}.optimizer._target_"
    if not target:
        raise ConfigError(f"{recipe.where}.optimizer has no _target_: use e.g. "
                          f"{key}=tf_keras.optimizers.SGD")
    try:
        _locate(target)
    except ImportError as exc:
        raise ConfigError(f"{key}={target} does not import ({str(exc).splitlines()[0][:120]}): "
                          "give a full path such as tf_keras.optimizers.AdamW") from None


def learning_rate_schedule(recipe: Recipe, steps_per_epoch: int, epochs: int):
    """The recipe's schedule over `epochs` of `steps_per_epoch` steps."""
    schedules = tf_keras.optimizers.schedules
    total = max(1, steps_per_epoch * epochs)
    schedule = recipe.schedule
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
    if warmup >= total:
        raise ConfigError(f"{recipe.where}.schedule.warmup_epochs={schedule.warmup_epochs} "
                          f"covers the whole phase ({epochs} epochs): shorten the warmup")
    rate = recipe.learning_rate
    if schedule.name == "cosine":  # linear warmup from 0, then cosine down to 0
        return schedules.CosineDecay(0.0 if warmup else rate, total - warmup, alpha=0.0,
                                     warmup_target=rate if warmup else None, warmup_steps=warmup)
    step = None
    if schedule.name == "step" and schedule.decay_epochs:
        # Keras switches after a boundary: the first step of epoch E (step E·n) gets the decay
        boundaries = [epoch * steps_per_epoch - 1 for epoch in schedule.decay_epochs]
        values = [rate * schedule.decay_rate**i for i in range(len(boundaries) + 1)]
        step = schedules.PiecewiseConstantDecay(boundaries, values)
    return Warmup(step, rate, warmup)


class Warmup(tf_keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `rate` over `warmup` steps, then `after` (None: constant rate).
    A schedule even when constant, so that Keras' TensorBoard callback logs the rate."""

    def __init__(self, after, rate: float, warmup: int) -> None:
        self.after, self.rate, self.warmup = after, rate, warmup

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        later = self.after(step) if self.after is not None else tf.constant(self.rate)
        if not self.warmup:
            return later
        return tf.where(step < self.warmup, self.rate * step / self.warmup, later)

    def get_config(self) -> dict:
        after = (tf_keras.optimizers.schedules.serialize(self.after)
                 if self.after is not None else None)
        return {"after": after, "rate": self.rate, "warmup": self.warmup}

    @classmethod
    def from_config(cls, config: dict) -> Warmup:
        after = config.get("after")
        return cls(tf_keras.optimizers.schedules.deserialize(after) if after else None,
                   config["rate"], config["warmup"])


def make_optimizer(recipe: Recipe, schedule):
    """Instantiate the recipe's optimizer with `schedule` as its learning rate."""
    from hydra.utils import instantiate

    check_optimizer(recipe)
    try:
        return instantiate(recipe.optimizer, learning_rate=schedule, _convert_="all")
    except Exception as exc:  # a bad keyword for that optimizer, mostly
        cause = exc.__cause__ or exc
        raise ConfigError(f"{recipe.where}.optimizer ({recipe.optimizer['_target_']}) could not "
                          f"be created: {str(cause).splitlines()[0][:160]}") from None


def classification_loss(label_smoothing: float, num_classes: int):
    """Cross-entropy on logits with integer labels; label smoothing through one-hot labels
    (tf_keras' sparse loss has no smoothing)."""
    if not label_smoothing:
        return tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def smoothed_crossentropy(y_true, logits):
        labels = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), num_classes)
        return tf_keras.losses.categorical_crossentropy(labels, logits, from_logits=True,
                                                        label_smoothing=label_smoothing)

    return smoothed_crossentropy
