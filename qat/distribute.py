"""TensorFlow's own distribution engine, chosen by `trainer.strategy`, and who writes files.

`default`: one device. `mirrored`: MirroredStrategy over this machine's GPUs. `multiworker`:
MultiWorkerMirroredStrategy across processes/hosts described by the `TF_CONFIG` environment
variable. BN statistics are per replica by default (each replica normalizes with its own share
of the global batch, as Keras' BN does; moving statistics are averaged when read);
`model.sync_bn=true` computes them over the global batch (`qat.layers.global_moments`), and
activation ranges always take the global batch's extremes (`qat.quantize.global_extent`).

Only the chief writes real checkpoints, TensorBoard events, metrics and exports; the other
workers still take part in every collective save, but into throw-away directories.
"""

from __future__ import annotations

import json
import os
import tempfile

import tensorflow as tf

from qat.errors import ConfigError


def make_strategy(name: str, cpu_replicas: int = 1) -> tf.distribute.Strategy:
    """Create the strategy first, before any other TensorFlow op (a MWMS requirement).

    `cpu_replicas` > 1 splits the CPU into that many logical devices, and a machine without GPUs
    then mirrors over them: several replicas on one machine, to test or debug distributed runs.
    """
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if not tf.config.list_physical_devices("GPU") and cpu_replicas > 1:
            return tf.distribute.MirroredStrategy(
                [f"/cpu:{i}" for i in range(cpu_replicas)])
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("trainer.strategy=multiworker needs the TF_CONFIG environment "
                              "variable describing the cluster and this worker's task")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"TF_CONFIG is not valid JSON ({exc.msg}): fix the variable") from exc
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"trainer.strategy={name} is unknown: use default, mirrored or multiworker")


def replicas_in_sync() -> int:
    """How many replicas share the batch the calling code sees (1 outside any strategy or in
    cross-replica context): above 1, batch statistics need a collective to be global."""
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """True on the one process that writes files: the chief, or worker 0 of a chief-less cluster."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def is_chief_process() -> bool:
    """`is_chief` for code outside any strategy: reads the cluster role from TF_CONFIG, the
    variable TensorFlow's multi-worker strategies are configured by."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError:
        return True
    task = config.get("task") or {}
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return (task.get("type") == "worker" and int(task.get("index", 0)) == 0
            and "chief" not in config.get("cluster", {}))


def write_dir(path: str, strategy: tf.distribute.Strategy | None = None) -> str:
    """`path` on the chief; a private temporary directory on every other worker."""
    if is_chief(strategy):
        return path
    return tempfile.mkdtemp(prefix="qat-worker-")
