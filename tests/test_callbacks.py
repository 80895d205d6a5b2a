"""qat's Keras callbacks inside a real `fit`: BN freeze after N steps, NaN stop, step timing."""

import numpy as np
import tf_keras

from qat.callbacks import FreezeBatchNormAfter, StepTimer, StopOnNonFinite
from qat.config import ModelConfig, QuantConfig
from qat.layers import batchnorm_layers
from qat.models import build_model
from qat.quantize import quantize_model


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (n, 8, 8, 1)).astype("float32"), rng.integers(0, 10, n)


def _compiled(model, lr=1e-3):
    model.compile(tf_keras.optimizers.Adam(lr),
                  tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_freeze_after_steps_stops_moving_statistics_mid_fit():
    qmodel = _compiled(quantize_model(build_model(ModelConfig(width=4), (8, 8, 1), 10),
                                      QuantConfig()))
    bns = batchnorm_layers(qmodel)
    x, y = _data()
    seen = []

    class Record(tf_keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([(bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy())
                         for bn in bns])

    qmodel.fit(x, y, batch_size=8, epochs=1, verbose=0,
               callbacks=[FreezeBatchNormAfter(bns, after_steps=3), Record()])
    assert all(int(bn.freeze_switch.numpy()) == 1 for bn in bns)
    for i in range(len(bns)):  # every BN, mean and variance, NHWC and N×C (fc_bn)
        for stat in (0, 1):
            assert not np.allclose(seen[0][i][stat], seen[2][i][stat])  # steps 1..3 update
            for later in seen[3:]:
                np.testing.assert_array_equal(later[i][stat], seen[2][i][stat])  # then frozen


def test_non_finite_loss_is_caught_with_its_step():
    model = _compiled(build_model(ModelConfig(width=4), (8, 8, 1), 10), lr=1e30)
    guard = StopOnNonFinite()
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[guard])
    assert guard.bad_step is not None and guard.bad_step >= 1
    assert int(model.optimizer.iterations.numpy()) == guard.bad_step  # stopped right there


def test_step_timer_logs_per_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _compiled(build_model(ModelConfig(width=4), (8, 8, 1), 10))
    timer = StepTimer(str(tmp_path), batch_size=8)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[timer])
    assert len(timer.all_ms) == 2 * 7 and timer.median_ms > 0  # first batch of each epoch left out
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"step_time_ms", "examples_per_sec"} <= set(acc.Tags()["tensors"])
    assert len(acc.Tensors("step_time_ms")) == 2
