"""Reliability: every bad input fails with one clear line and leaves the run dir untouched;
a phase killed mid-epoch resumes from its backup and ends with the expected step count."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

TINY = ["data=synthetic", "data.image_size=8", "data.train_examples=128", "data.val_examples=64",
        "model.width=4", "trainer.epochs=1", "trainer.batch_size=32", "quant.epochs=1",
        "trainer.verbose=0"]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reliability") / "float_run"
    proc = run_cli("qat.train", "phase=float", f"run.dir={run}", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")} if root.exists() else {}


def _npz(path, **changes):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
              "y_train": rng.integers(0, 3, 40), "x_test": rng.integers(0, 256, (10, 8, 8),
                                                                        dtype=np.uint8),
              "y_test": rng.integers(0, 3, 10)}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return f"data.path={path}"


def _corrupt_copy(float_run, dest):
    import shutil

    shutil.copytree(float_run / "float", dest / "float")
    for data in (dest / "float").glob("ckpt-*.data-*"):
        data.write_bytes(data.read_bytes()[:100])
    return f"quant.init_from={dest / 'float'}"


def _user_model(path, image_size=8, activation="relu_layer"):
    """A user's saved float model (Keras BN) for the synthetic TINY data (8×8×1, 10 classes)."""
    import tf_keras

    inputs = tf_keras.Input((image_size, image_size, 1))
    x = tf_keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    x = tf_keras.layers.BatchNormalization()(x)
    x = (tf_keras.layers.ReLU() if activation == "relu_layer" else
         tf_keras.layers.Activation(activation, name="user_act"))(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    tf_keras.Model(inputs, tf_keras.layers.Dense(10)(x)).save(path)
    return f"model.path={path}"


def _folder(root, classes):
    for name in classes:
        (root / name).mkdir(parents=True)
    return f"data.path={root}"


# name, arguments (a callable gets (tmp_path, float_run)), exit code, message
CASES = [
    ("unknown keras arch", ["model=keras", "model.arch=ResNet51"], 2,
     "is not a tf_keras.applications model (did you mean"),
    ("unimportable target", ["model=target", "model.target=nowhere.nets:build"], 2,
     "cannot be imported"),
    ("missing model file", ["model=file", "model.path=/nonexistent/user.keras"], 2,
     "does not exist"),
    ("model file of another input shape",
     lambda tmp, fr: ["model=file", _user_model(tmp / "big.keras", image_size=12)], 2,
     "the data is (8, 8, 1)"),
    ("layer without a quantization rule",
     lambda tmp, fr: ["phase=quant", "model=file", _user_model(tmp / "elu.h5", activation="elu")],
     2, "layer user_act (Activation 'elu') has no quantization rule"),
    ("unknown key", ["trainer.epoch=3"], 1, "Key 'epoch' not in 'TrainerConfig'"),
    ("wrong type", ["trainer.epochs=two"], 1, "could not be converted to Integer"),
    ("bits out of range", ["quant.weight_bits=17"], 2, "quant.weight_bits=17 is out of range"),
    ("negative epochs", ["trainer.epochs=-1"], 2, "trainer.epochs=-1 must be >= 1"),
    ("batch size 0", ["trainer.batch_size=0"], 2, "trainer.batch_size=0 must be >= 1"),
    ("no float checkpoint", ["phase=quant"], 2, "no float checkpoint in"),
    ("float checkpoint of another model",
     lambda tmp, fr: ["phase=quant", f"quant.init_from={fr / 'float'}", "model.width=8"], 2,
     "does not fit this model"),
    ("truncated checkpoint",
     lambda tmp, fr: ["phase=quant", _corrupt_copy(fr, tmp / "corrupt")], 2,
     "is corrupt or truncated"),
    ("npz missing file", ["data=npz", "data.path=/nonexistent/data.npz"], 2, "does not exist"),
    ("folder missing", ["data=folder", "data.path=/nonexistent/images"], 2,
     "is not a directory"),
    ("folder with one class", lambda tmp, fr: ["data=folder", _folder(tmp / "one", ["cats"])], 2,
     "has one class folder (cats)"),
    ("folder without images", lambda tmp, fr: ["data=folder", _folder(tmp / "e", ["a", "b"])],
     2, "has class folders but no"),
    ("tfds dataset not prepared offline",
     lambda tmp, fr: ["data=tfds", "data.tfds_name=mnist", f"data.data_dir={tmp / 'none'}"], 2,
     "tfds dataset mnist is not prepared in"),
    ("optimizer that does not import", ["trainer.optimizer._target_=tf_keras.optimizers.Nope"],
     2, "trainer.optimizer._target_=tf_keras.optimizers.Nope does not import"),
    ("16-bit activations cannot be exported", ["phase=all", "quant.activation_bits=16"], 2,
     "quant.activation_bits above 8 cannot be exported to the full-int8 file"),
    ("warmup longer than training", ["trainer.schedule.warmup_epochs=5"], 2,
     "trainer.schedule.warmup_epochs=5.0 must be >= 0 and shorter than the phase (1 epochs)"),
    ("npz missing keys", lambda tmp, fr: ["data=npz", _npz(tmp / "a.npz", y_test=None)], 2,
     "lacks ['y_test']"),
    ("npz labels out of range",
     lambda tmp, fr: ["data=npz", _npz(tmp / "b.npz", y_train=-np.ones(40, int))], 2,
     "out of range"),
    ("npz inconsistent images",
     lambda tmp, fr: ["data=npz", _npz(tmp / "c.npz", x_test=np.zeros((10, 6, 6), np.uint8))], 2,
     "all images must share one"),
    ("run dir not writable", lambda tmp, fr: [f"run.dir={tmp / 'file.txt' / 'run'}"], 2,
     "cannot write to"),
    ("dataset needs the network", ["data=mnist"], 2, "use data=npz"),
    ("finished run not overwritten", lambda tmp, fr: [f"run.dir={fr}"], 2,
     "holds a finished phase"),
    ("export without a quant checkpoint", lambda tmp, fr: ["EXPORT", f"run.dir={fr}"], 2,
     "no quant checkpoint in"),
]


@pytest.mark.parametrize("name, args, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_line_and_changes_nothing(tmp_path, float_run, name, args, code,
                                                           message):
    work = tmp_path / "work"  # everything the command may touch; HOME lives outside it
    work.mkdir()
    (work / "file.txt").write_text("a file, not a directory")
    args = args(work, float_run) if callable(args) else args
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("run.dir=")), None)
    if run_dir is None:
        run_dir = str(work / "run")
        args = [*args, f"run.dir={run_dir}"]
    watched = [work, float_run]
    before = [_snapshot(root) for root in watched]
    env = {"HOME": str(tmp_path / "home"), "KERAS_HOME": str(tmp_path / "home" / "keras"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    if args[0] == "EXPORT":  # the standalone exporter, on a run that has no quant phase
        proc = run_cli("qat.export", *args[1:], extra_env=env)
    else:
        proc = run_cli("qat.train", *[a for a in TINY if a.split("=")[0] not in
                                      {x.split("=")[0] for x in args}], *args, extra_env=env)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert message in proc.stderr
    if code == 2:  # qat's own errors: one line, last, no traceback (TensorFlow's C++ start-up
        # chatter may come before it: it is printed before its logging can be configured)
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("qat: error: ") and message in lines[-1], proc.stderr
        assert sum(line.startswith("qat: error") for line in lines) == 1
        assert "Traceback" not in proc.stderr
    assert [_snapshot(root) for root in watched] == before


def test_interrupted_run_resumes_only_with_its_own_settings(tmp_path, float_run):
    """A backup left by a killed run is not resumed under different training settings."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(float_run / "float", run / "float")
    (run / "float" / "metrics.json").unlink()  # as if killed before the end
    (run / "float" / "backup").mkdir()
    before = _snapshot(run)
    proc = run_cli("qat.train", *TINY, "trainer.learning_rate=0.1", f"run.dir={run}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "interrupted run started with other settings (trainer.learning_rate)" in last
    assert _snapshot(run) == before


def test_nan_loss_stops_and_names_the_step(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("qat.train", *TINY, "trainer.epochs=3", "trainer.learning_rate=1e30",
                   f"run.dir={run}")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "loss became NaN/Inf at step" in line and "lower the learning rate" in line
    assert not (run / "float" / "metrics.json").exists()


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def _backup_step(float_dir):
    """Number of backups taken so far in the float phase (BackupAndRestore numbers its saves)."""
    numbers = [int(p.name.split("-")[1].split(".")[0])
               for p in float_dir.glob("backup/*/ckpt-*.index")]
    return max(numbers, default=0)


def _int8_accuracy(path, run):
    """Accuracy of the written int8 file on the run's validation data, measured here: the data
    rebuilt from the run's stored config, inputs quantized with the file's own scale/zero-point."""
    from ai_edge_litert.interpreter import Interpreter

    from qat.config import DataConfig
    from qat.data import load_arrays

    stored = json.loads((run / "quant" / "config.json").read_text())
    arrays = load_arrays(DataConfig(**stored["data"]))
    x, y = arrays.x_val, arrays.y_val
    interpreter = Interpreter(model_path=str(path))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if inp["dtype"] == np.int8:
        scale, zero_point = inp["quantization"]
        assert scale > 0
        x = np.clip(np.round(x / scale + zero_point), -128, 127).astype(np.int8)
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    logits = interpreter.get_tensor(out["index"])  # int8 or float: a positive scale keeps argmax
    assert len(logits) == len(y) == stored["data"]["val_examples"]
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def test_killed_phase_resumes_and_ends_with_the_expected_steps(tmp_path):
    run = tmp_path / "run"
    args = ["qat.train", "phase=all", f"run.dir={run}", *TINY, "trainer.epochs=6",
            "trainer.steps_per_epoch=20", "trainer.save_every_steps=5", "trainer.batch_size=16",
            "trainer.verbose=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    float_dir = run / "float"
    # Kill during epoch 2 or later: the fifth backup is taken at step 25.
    started = _wait_for(lambda: _backup_step(float_dir) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert started, "the float phase never reached its fifth backup"
    assert not (float_dir / "metrics.json").exists()

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "resuming the interrupted run" in output
    assert "Epoch 1/6" not in output  # continued, not restarted
    metrics = json.loads((float_dir / "metrics.json").read_text())
    assert metrics["steps"] == 120 and metrics["epochs"] == 6
    assert not (float_dir / "backup").exists()
    report = json.loads((run / "export" / "report.json").read_text())
    int8_file = run / "export" / "model_int8.tflite"
    assert report["int8_bytes"] == int8_file.stat().st_size
    assert report["tflite_int8_accuracy"] == _int8_accuracy(int8_file, run)
