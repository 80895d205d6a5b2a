"""The training recipe: optimizers instantiated from YAML, schedules, label smoothing, errors."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from hydra import compose, initialize_config_dir

from qat.config import ScheduleConfig, register_configs, to_settings
from qat.errors import ConfigError
from qat.recipe import (
    Recipe,
    classification_loss,
    learning_rate_schedule,
    make_optimizer,
    phase_recipe,
)
from tests.conftest import REPO

register_configs()


def _settings(*overrides):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return to_settings(compose("config", overrides=list(overrides)))


def _rates(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


def _optimizer(settings, phase):
    recipe = phase_recipe(settings, phase)
    return make_optimizer(recipe, learning_rate_schedule(recipe, 10, 4))


def test_optimizers_come_from_yaml_for_each_phase():
    settings = _settings("recipe=sgd_cosine")
    sgd = _optimizer(settings, "float")
    assert isinstance(sgd, tf_keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.9
    assert float(sgd.learning_rate) == pytest.approx(0.0)  # warmup starts from 0
    quant = _optimizer(settings, "quant")  # quant.optimizer null: the trainer's, own rate
    assert isinstance(quant, tf_keras.optimizers.SGD)
    assert float(quant.learning_rate) == pytest.approx(0.01)
    settings = _settings("optimizer=adamw", "+optimizer@quant.optimizer=sgd")
    adamw = _optimizer(settings, "float")
    assert isinstance(adamw, tf_keras.optimizers.AdamW) and adamw.weight_decay == 1e-4
    assert isinstance(_optimizer(settings, "quant"), tf_keras.optimizers.SGD)
    assert isinstance(_optimizer(_settings(), "float"), tf_keras.optimizers.Adam)


def test_schedules_over_a_phase():
    recipe = Recipe("trainer", {"_target_": "x"}, 0.1, ScheduleConfig("cosine", warmup_epochs=1))
    cosine = _rates(learning_rate_schedule(recipe, 10, 5), [0, 5, 10, 30, 50])
    np.testing.assert_allclose(cosine, [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-6)
    recipe = Recipe("trainer", {}, 0.1, ScheduleConfig("step", decay_epochs=[2, 4]))
    step = _rates(learning_rate_schedule(recipe, 10, 5), [0, 19, 20, 39, 40])
    np.testing.assert_allclose(step, [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-5)
    recipe = Recipe("trainer", {}, 0.1, ScheduleConfig("constant", warmup_epochs=0.5))
    constant = _rates(learning_rate_schedule(recipe, 10, 5), [0, 1, 5, 49])
    np.testing.assert_allclose(constant, [0.0, 0.02, 0.1, 0.1], rtol=1e-5)
    with pytest.raises(ConfigError, match="covers the whole phase"):
        learning_rate_schedule(Recipe("quant", {}, 0.1, ScheduleConfig(warmup_epochs=0.99)), 1, 1)


def test_a_schedule_survives_its_config():
    """An optimizer's config (what a saved model stores) rebuilds the same rates: the decay after
    the warmup included."""
    from qat.recipe import Warmup

    recipe = Recipe("trainer", {}, 0.1, ScheduleConfig("step", warmup_epochs=1,
                                                       decay_epochs=[2, 4]))
    schedule = learning_rate_schedule(recipe, 10, 5)
    assert isinstance(schedule, Warmup)
    rebuilt = Warmup.from_config(schedule.get_config())
    steps = [0, 5, 10, 25, 45]
    np.testing.assert_allclose(_rates(rebuilt, steps), _rates(schedule, steps), rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.optimizer._target_=tf_keras.optimizers.Nope"], "does not import"),
    (["trainer.optimizer._target_=no_such_package.Opt"], "does not import"),
    (["+trainer.optimizer.momentum_typo=0.9"], "could not be created"),
])
def test_bad_optimizer_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        _optimizer(_settings(*overrides), "float")
    assert "\n" not in str(info.value)


def test_warmup_longer_than_training_fails_at_compose_time():
    with pytest.raises(ConfigError, match="trainer.schedule.warmup_epochs=12.0 must be"):
        _settings("trainer.schedule.warmup_epochs=12")
    with pytest.raises(ConfigError, match="quant.schedule.name=linear is unknown"):
        _settings("quant.schedule.name=linear")


def test_label_smoothing_matches_its_definition():
    logits = tf.constant([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = tf.constant([0, 2])
    smoothed = float(tf.reduce_mean(classification_loss(0.1, 3)(labels, logits)))
    log_p = tf.nn.log_softmax(logits).numpy()
    target = np.full((2, 3), 0.1 / 3) + 0.9 * np.eye(3)[[0, 2]]
    assert smoothed == pytest.approx(float(np.mean(-(target * log_p).sum(-1))), rel=1e-5)
    plain = classification_loss(0.0, 3)(labels, logits)
    assert float(plain) == pytest.approx(float(np.mean(-log_p[[0, 1], [0, 2]])), rel=1e-5)
