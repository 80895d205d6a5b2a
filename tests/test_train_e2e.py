"""The CLI end to end, as a user runs it: float, quant, export, and their clear failures."""

import json

import numpy as np
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in logdir.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])
    return tags


def test_float_then_quant_on_digits(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("qat.train", "phase=float", f"run.dir={run}", "trainer.verbose=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "float" / "checkpoint").exists()
    assert list((run / "float").glob("ckpt-*.index"))
    float_metrics = json.loads((run / "float" / "metrics.json").read_text())
    for key in ("val_accuracy", "val_loss", "step_time_ms", "examples_per_sec", "epochs", "steps"):
        assert key in float_metrics
    assert float_metrics["val_accuracy"] >= 0.95
    tags = _tags(run / "tb" / "float")
    assert {"epoch_accuracy", "epoch_loss", "step_time_ms", "examples_per_sec"} <= tags

    # export.enabled=false: the quant phase ends the run; the standalone exporter exports it
    # later from the run's stored config.
    proc = run_cli("qat.train", "phase=quant", f"run.dir={run}", "trainer.verbose=0",
                   "export.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    quant_metrics = json.loads((run / "quant" / "metrics.json").read_text())
    assert abs(quant_metrics["val_accuracy"] - float_metrics["val_accuracy"]) <= 0.01
    assert {"epoch_accuracy", "step_time_ms"} <= _tags(run / "tb" / "quant")
    assert not (run / "export").exists()

    # A finished phase is not overwritten by accident.
    again = run_cli("qat.train", "phase=float", f"run.dir={run}", "trainer.epochs=1")
    assert again.returncode == 2 and "run.overwrite=true" in again.stderr
    assert json.loads((run / "float" / "metrics.json").read_text()) == float_metrics

    export = run_cli("qat.export", f"run.dir={run}")
    assert export.returncode == 0, export.stderr[-3000:]
    printed = json.loads(export.stdout[export.stdout.index("{"):])
    report = json.loads((run / "export" / "report.json").read_text())
    assert printed["int8_agreement"] == report["int8_agreement"] >= 0.99
    assert abs(report["tflite_int8_accuracy"] - float_metrics["val_accuracy"]) <= 0.01


def test_quant_without_float_checkpoint_fails_clearly(tmp_path):
    proc = run_cli("qat.train", "phase=quant", f"run.dir={tmp_path / 'empty'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("qat: error: no float checkpoint") and "phase" in lines[-1]
    assert not (tmp_path / "empty" / "quant").exists()


def test_export_without_quant_checkpoint_fails_clearly(tmp_path):
    proc = run_cli("qat.export", f"run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "no quant checkpoint" in proc.stderr and "phase=quant" in proc.stderr


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_quant_phase_fine_tunes_a_users_trained_keras_model(tmp_path, suffix):
    """A float model trained elsewhere with plain Keras BN: `phase=quant model=file` needs no
    float phase, and the int8 file it ships is as accurate as the user's float model."""
    import tf_keras
    from tf_keras import layers

    from qat.config import DataConfig
    from qat.data import load_arrays

    arrays = load_arrays(DataConfig())
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input(arrays.input_shape)
    x = inputs
    for i, width in enumerate((16, 32)):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x))
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    model = tf_keras.Model(inputs, layers.Dense(10, activation="softmax", name="probs")(x))
    model.compile(tf_keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(arrays.x_train, arrays.y_train, batch_size=64, epochs=10, verbose=0)
    float_accuracy = model.evaluate(arrays.x_val, arrays.y_val, verbose=0)[1]
    path = tmp_path / f"user{suffix}"
    model.save(path)

    run = tmp_path / "run"
    proc = run_cli("qat.train", "phase=quant", "model=file", f"model.path={path}",
                   f"run.dir={run}", "trainer.verbose=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / "float").exists()  # started from the file, no float phase
    report = json.loads((run / "export" / "report.json").read_text())
    assert float_accuracy > 0.9
    # Issue #11's bar: the int8 file within 0.3 pt of the user's float model (measured: float
    # 0.961, int8 file 0.983, agreement 1.000 for both formats).
    assert report["tflite_int8_accuracy"] >= float_accuracy - 0.003
    assert report["int8_agreement"] >= 0.99
    assert report["int8_float_tensors"] == []


def test_folder_of_images_with_augmentation_and_a_cosine_schedule(tmp_path):
    """data=folder end to end: streamed PNGs, training-only augmentation, warmup + cosine,
    the learning rate in TensorBoard, class names in the run dir, the int8 file evaluated;
    normalized to [-1, 1) in training, yet the file takes the raw pixels."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import write_image_folder

    write_image_folder(tmp_path / "images", size=16)  # trained at the files' own size
    run = tmp_path / "run"
    proc = run_cli("qat.train", "phase=all", "data=folder", f"data.path={tmp_path / 'images'}",
                   "data.augment.crop_padding=2", "trainer.epochs=6",
                   "trainer.schedule.name=cosine", "trainer.schedule.warmup_epochs=1",
                   "quant.epochs=1", f"run.dir={run}", "trainer.verbose=0",
                   "export.max_examples=200", "export.input_dtype=uint8",
                   "data.normalize=symmetric")
    assert proc.returncode == 0, proc.stderr[-3000:]
    described = json.loads((run / "float" / "data.json").read_text())
    assert described["class_names"] == [f"digit_{d}" for d in range(10)]
    assert described["input_shape"] == [16, 16, 3]
    report = json.loads((run / "export" / "report.json").read_text())
    assert report["eval_examples"] == 200
    assert report["tflite_int8_accuracy"] >= 0.85 and report["int8_agreement"] >= 0.99
    rates = []
    for events in sorted((run / "tb" / "float" / "train").glob("events.out.tfevents*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "epoch_learning_rate" in acc.Tags()["tensors"]:
            rates = [float(tf.make_ndarray(event.tensor_proto))
                     for event in acc.Tensors("epoch_learning_rate")]
    assert len(rates) == 6 and rates[0] == max(rates) and rates[-1] < 0.1 * rates[0]

    # The int8 file takes the raw pixels of the files (uint8, RGB), no scaling by the user: the
    # model's (p - 128)/128 is the uint8 input's own scale and zero point. Fed the first 200
    # validation files' bytes, it scores what report.json says.
    from ai_edge_litert.interpreter import Interpreter

    from qat.config import DataConfig
    from qat.data import load_data

    data = load_data(DataConfig(name="folder", path=str(tmp_path / "images"), channels=3))
    val = list(data.val.take(200).as_numpy_iterator())
    pixels = np.stack([tf.io.decode_png(tf.io.read_file(path), channels=3).numpy()
                       for path, _ in val])
    int8_file = str(run / "export" / "model_int8.tflite")
    runner = Interpreter(model_path=int8_file).get_signature_runner()
    ((name, detail),) = runner.get_input_details().items()
    assert detail["dtype"] == np.uint8 and detail["quantization"] == (pytest.approx(1 / 128), 128)
    ((logits),) = runner(**{name: pixels}).values()
    raw_accuracy = float(np.mean(np.argmax(logits, -1) == np.array([y for _, y in val])))
    assert raw_accuracy == report["tflite_int8_accuracy"]


def test_tfds_dataset_end_to_end(tmp_path):
    """data=tfds on a dataset prepared offline: trains, exports, evaluates on its test split."""
    from tests.conftest import write_tfds_dataset

    name = write_tfds_dataset(tmp_path / "tfds")
    run = tmp_path / "run"
    proc = run_cli("qat.train", "phase=all", "data=tfds", f"data.tfds_name={name}",
                   f"data.data_dir={tmp_path / 'tfds'}", "data.image_size=16", "trainer.epochs=4",
                   "quant.epochs=1", f"run.dir={run}", "trainer.verbose=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "export" / "report.json").read_text())
    assert report["eval_examples"] == 297 and report["tflite_int8_accuracy"] >= 0.8
    assert json.loads((run / "float" / "data.json").read_text())["class_names"] == [
        str(d) for d in range(10)]
