"""tf.distribute: MultiWorkerMirroredStrategy with two local worker processes matches one worker
on the same global batch; only the chief writes files.

The single worker mirrors over two logical CPUs, so both runs split each global batch into the
same two per-replica halves: BN normalizes per replica, and a one-replica run differs by exactly
that (tiny-gradient weights even step the other way under Adam), which is not what is tested.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from qat.distribute import is_chief_process, make_strategy
from qat.errors import ConfigError
from tests.conftest import REPO, run_cli

ARGS = ["data=synthetic", "data.image_size=8", "data.train_examples=256", "data.val_examples=64",
        "model.width=4", "trainer.epochs=1", "trainer.steps_per_epoch=4", "trainer.batch_size=32",
        "trainer.learning_rate=0.01", "quant.epochs=1", "quant.learning_rate=0.001",
        "trainer.verbose=0"]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(checkpoint_dir):
    reader = tf.train.load_checkpoint(str(checkpoint_dir))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith("model/") and "OPTIMIZER" not in key}


@pytest.mark.slow
def test_two_workers_match_one_worker_on_the_same_global_batch(tmp_path):
    single = tmp_path / "single"
    proc = run_cli("qat.train", "phase=all", f"run.dir={single}", "trainer.strategy=mirrored",
                   "trainer.cpu_replicas=2", *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for index in range(2):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "qat.train", "phase=all", "trainer.strategy=multiworker",
             f"run.dir={multi}", *ARGS], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]

    for phase in ("float", "quant"):
        ref, got = _weights(single / phase), _weights(multi / phase)
        assert ref.keys() == got.keys()
        trained = [k for k in ref if k.endswith(("kernel/.ATTRIBUTES/VARIABLE_VALUE",
                                                  "gamma/.ATTRIBUTES/VARIABLE_VALUE",
                                                  "moving_mean/.ATTRIBUTES/VARIABLE_VALUE"))]
        assert len(trained) >= 10
        for key in trained:
            scale = np.abs(ref[key]).max()
            assert np.abs(ref[key] - got[key]).max() <= 1e-5 * scale, key
    steps = json.loads((multi / "float" / "metrics.json").read_text())["steps"]
    assert steps == 4
    assert (multi / "export" / "report.json").is_file()
    # Only the chief wrote: one set of event files per TensorBoard directory.
    assert len(list((multi / "tb" / "float" / "train").glob("events.out.tfevents*"))) <= 2


def test_multiworker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        make_strategy("multiworker")


@pytest.mark.parametrize("config, chief", [
    (None, True),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}},
     False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
     True),
])
def test_chief_is_the_only_writer(monkeypatch, config, chief):
    if config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert is_chief_process() is chief
