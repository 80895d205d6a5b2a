"""`python -m qat.bench`: train-step benchmarks, measured side by side in one process → JSON.

Every candidate is warmed up (traced, allocated), then timed in interleaved rounds — A B C D,
A B C D, ... — so slow drift of a shared machine hits all of them alike; each figure is the
median over rounds of the mean step time within a round (ms), each ratio the median of the
ratios taken within a round; the raw per-round figures are written too (`rounds`), so every
summary can be recomputed. TensorFlow runs on one thread unless `--threads` says otherwise: on
a shared 2-core machine the per-round quant/float network ratio had an interquartile range of
0.93-1.31 with two threads, 1.02-1.08 with one (measured; figures in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from qat.config import ModelConfig, QuantConfig
from qat.layers import QuantBatchNorm, set_switches, synchronize_batchnorms
from qat.models import build_model
from qat.quantize import quantize_model


class NaiveBatchNorm(tf_keras.layers.Layer):
    """BN from elementwise ops (moments + arithmetic): the slow reference qat exists to avoid."""

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = momentum, epsilon

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")
        self.moving_mean = self.add_weight(name="moving_mean", shape=(c,), initializer="zeros",
                                           trainable=False)
        self.moving_variance = self.add_weight(name="moving_variance", shape=(c,),
                                               initializer="ones", trainable=False)

    def call(self, x, training=None):
        if training:
            mean, variance = tf.nn.moments(x, axes=list(range(x.shape.rank - 1)))
            self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * mean)
            self.moving_variance.assign(
                self.momentum * self.moving_variance + (1 - self.momentum) * variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        return (x - mean) * tf.math.rsqrt(variance + self.epsilon) * self.gamma + self.beta


def _layer_step(layer: tf_keras.layers.Layer, x: tf.Tensor) -> Callable[[], tf.Tensor]:
    """A compiled train step of one layer: forward, loss, gradients w.r.t. input and weights."""
    layer(x, training=True)
    variables = layer.trainable_variables

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.square(layer(x, training=True)))
        grads = tape.gradient(loss, [x, *variables])
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    return step


def _model_step(model: tf_keras.Model, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
    """Keras' own compiled train step as `fit` runs it: one iterator over the batch, repeated.

    Not `train_on_batch`: it builds a dataset iterator per call and deletes it after, and on a
    quant MobileNetV2 that deletion stalled about one call in three for a whole extra step (a
    75 ms `TFE_DeleteTensorHandle`, measured with the TF profiler), which `fit` never pays.
    """
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-3),
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)).repeat()
    iterator = iter(model.distribute_strategy.experimental_distribute_dataset(batches))
    train = model.make_train_function()
    return lambda: train(iterator)["loss"]


def _sync(result) -> None:
    if isinstance(result, tf.Tensor):
        result.numpy()


def time_rounds(steps: dict[str, Callable], rounds: int, steps_per_round: int,
                warmup: int = 3) -> dict[str, list[float]]:
    """Mean step time (ms) of each candidate in each of `rounds` interleaved rounds."""
    for fn in steps.values():
        for _ in range(warmup):
            _sync(fn())
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                result = fn()
            _sync(result)
            samples[name].append((time.perf_counter() - start) * 1e3 / steps_per_round)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.median(values)) for name, values in samples.items()}


def paired_ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a/b measured in the same round: drift of a shared machine cancels."""
    return float(np.median(np.asarray(samples[a]) / np.asarray(samples[b])))


def ratio_spread(samples: dict[str, list[float]], a: str, b: str) -> list[float]:
    """25th and 75th percentile of the per-round a/b ratios: how far one figure can be trusted."""
    ratios = np.asarray(samples[a]) / np.asarray(samples[b])
    return [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]


def bench_bn_layer(shape: tuple[int, ...], rounds: int, steps: int) -> dict[str, list[float]]:
    x = tf.random.normal(shape)
    qat_float, qat_quant = QuantBatchNorm(), QuantBatchNorm()
    qat_quant.build(shape)
    set_switches(None, quantize=True, layers=[qat_quant])
    candidates = {
        "keras_fused": _layer_step(tf_keras.layers.BatchNormalization(fused=True), x),
        "naive": _layer_step(NaiveBatchNorm(), x),
        "qat_float": _layer_step(qat_float, x),
        "qat_quant": _layer_step(qat_quant, x),
    }
    return time_rounds(candidates, rounds, steps)


def _keras_bn_net(cfg: ModelConfig, input_shape, classes) -> tf_keras.Model:
    keras_bn = lambda name: tf_keras.layers.BatchNormalization(name=name)  # noqa: E731
    return build_model(cfg, input_shape, classes, bn=keras_bn)


def bench_network(model_name: str, image: tuple[int, int, int], batch: int, width: int,
                  rounds: int, steps: int) -> tuple[dict[str, list[float]], tf_keras.Model]:
    """Full Keras train steps: qat float phase, qat quant phase, tfmot's default on keras BN."""
    cfg = ModelConfig(name=model_name, width=width)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, *image)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    float_net = build_model(cfg, image, 10)
    quant_net = quantize_model(build_model(cfg, image, 10), QuantConfig())
    tfmot_net = tfmot.quantization.keras.quantize_model(_keras_bn_net(cfg, image, 10))
    candidates = {
        "float_phase": _model_step(float_net, x, y),
        "quant_phase": _model_step(quant_net, x, y),
        "tfmot_default": _model_step(tfmot_net, x, y),
    }
    return time_rounds(candidates, rounds, steps), quant_net


def bench_sync_bn(model_name: str, image: tuple[int, int, int], batch: int, width: int,
                  rounds: int, steps: int, replicas: int) -> dict[str, list[float]]:
    """Keras train steps mirrored over `replicas` logical CPUs, BN per replica vs synchronized
    (`model.sync_bn`), float and quant phase: what the global-batch statistics cost."""
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    cfg = ModelConfig(name=model_name, width=width)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, *image)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    candidates = {}
    with strategy.scope():
        for sync in (False, True):
            suffix = "sync" if sync else "per_replica"
            nets = {"float": build_model(cfg, image, 10), "quant": build_model(cfg, image, 10)}
            for net in nets.values():
                if sync:
                    synchronize_batchnorms(net)
            nets["quant"] = quantize_model(nets["quant"], QuantConfig())
            for phase, net in nets.items():
                candidates[f"{phase}_{suffix}"] = _model_step(net, x, y)
    return time_rounds(candidates, rounds, steps)


def bench_application(arch: str, kwargs: dict, image: tuple[int, int, int], batch: int,
                      rounds: int, steps: int, prefix: str = "app") -> dict[str, list[float]]:
    """A keras.applications net: qat float (prepared) vs qat quant vs tfmot `quantize_model`,
    as `{prefix}_float`, `{prefix}_quant` and `{prefix}_tfmot`."""
    from qat.api import prepare

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, *image)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)

    def original():
        return getattr(tf_keras.applications, arch)(
            input_shape=image, classes=10, weights=None, classifier_activation=None, **kwargs)

    float_net = prepare(original())  # three separate builds: no weights shared
    candidates = {
        f"{prefix}_float": _model_step(float_net, x, y),
        f"{prefix}_quant": _model_step(quantize_model(prepare(original()), QuantConfig()), x, y),
        f"{prefix}_tfmot": _model_step(tfmot.quantization.keras.quantize_model(original()), x,
                                       y),
    }
    return time_rounds(candidates, rounds, steps)


def _kwargs(text: str) -> dict:
    """"alpha=0.35,depth_multiplier=1" -> {"alpha": 0.35, "depth_multiplier": 1}."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {key: json.loads(value) for key, value in pairs}


def bench_tflite(quant_net: tf_keras.Model, cfg: ModelConfig, batch: int,
                 rounds: int) -> dict[str, list[float]]:
    """Inference per batch of the exported float and int8 files (the quant net, folded)."""
    from ai_edge_litert.interpreter import Interpreter

    from qat.export import export_float_tflite, export_int8_tflite
    from qat.fold import dequantized_float_model, fold_batchnorms

    image = tuple(quant_net.input_shape[1:])
    x = np.random.default_rng(1).uniform(0, 1, (batch, *image)).astype(np.float32)
    quant_net(x, training=True)  # give every range a value
    folded = fold_batchnorms(dequantized_float_model(quant_net, build_model(cfg, image, 10)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"float_ms": os.path.join(tmp, "float.tflite"),
                 "int8_ms": os.path.join(tmp, "int8.tflite")}
        export_float_tflite(folded, paths["float_ms"])
        export_int8_tflite(quantize_model(folded, QuantConfig()), paths["int8_ms"], int8_io=True)
        runners = {}
        for name, path in paths.items():
            interpreter = Interpreter(model_path=path)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, x.shape)
            interpreter.allocate_tensors()
            dtype = interpreter.get_input_details()[0]["dtype"]
            interpreter.set_tensor(index, x if dtype == np.float32 else np.zeros(x.shape, dtype))
            runners[name] = interpreter.invoke
        return time_rounds(runners, rounds, 5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--bn-shape", default="64,56,56,64", help="BN input N,H,W,C")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--image", default="32,32,3", help="network input H,W,C")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--arch", default="MobileNetV2",
                        help="a tf_keras.applications net to time too ('' to skip)")
    parser.add_argument("--arch-kwargs", default="alpha=0.35")
    parser.add_argument("--arch-image", default="96,96,3")
    parser.add_argument("--arch-batch", type=int, default=16)
    parser.add_argument("--large-arch", default="ResNet50",
                        help="a tf_keras.applications net with large kernels (3x3x512x512: "
                             "per-channel kernel fake-quant dominates there) ('' to skip)")
    parser.add_argument("--large-arch-image", default="64,64,3")
    parser.add_argument("--large-arch-batch", type=int, default=8)
    parser.add_argument("--sync-replicas", type=int, default=2,
                        help="logical CPUs to mirror over for the sync_bn on/off figures "
                             "(0 to skip)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow threads (0: its default, all cores). 1, as in "
                             "torch.utils.benchmark: ratios that repeat on a shared machine")
    args = parser.parse_args(argv)
    if args.sync_replicas > 1:  # before any other TensorFlow op
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * args.sync_replicas)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    bn_shape = tuple(int(v) for v in args.bn_shape.split(","))
    image = tuple(int(v) for v in args.image.split(","))

    bn = bench_bn_layer(bn_shape, args.rounds, args.steps)
    network, quant_net = bench_network(args.model, image, args.batch, args.width, args.rounds,
                                       args.steps)
    tflite = bench_tflite(quant_net, ModelConfig(name=args.model, width=args.width), args.batch,
                          args.rounds)
    application = bench_application(
        args.arch, _kwargs(args.arch_kwargs), tuple(int(v) for v in args.arch_image.split(",")),
        args.arch_batch, args.rounds, args.steps) if args.arch else {}
    large = bench_application(
        args.large_arch, {}, tuple(int(v) for v in args.large_arch_image.split(",")),
        args.large_arch_batch, args.rounds, args.steps, prefix="large") if args.large_arch else {}
    sync = bench_sync_bn(args.model, image, args.batch, args.width, args.rounds, args.steps,
                         args.sync_replicas) if args.sync_replicas > 1 else {}
    pairs = {  # ratios taken within each round, then summarized over rounds
        "qat_quant/keras_fused": (bn, "qat_quant", "keras_fused"),
        "qat_float/keras_fused": (bn, "qat_float", "keras_fused"),
        "naive/keras_fused": (bn, "naive", "keras_fused"),
        "quant_phase/float_phase": (network, "quant_phase", "float_phase"),
        "quant_phase/tfmot_default": (network, "quant_phase", "tfmot_default"),
    }
    for samples, prefix in ((application, "app"), (large, "large")):
        pairs.update({f"{prefix}_quant/{prefix}_{base}": (samples, f"{prefix}_quant",
                                                          f"{prefix}_{base}")
                      for base in ("float", "tfmot") if samples})
    if sync:
        pairs.update({
            "float_sync/float_per_replica": (sync, "float_sync", "float_per_replica"),
            "quant_sync/quant_per_replica": (sync, "quant_sync", "quant_per_replica")})
    result = {
        "bn_layer": medians(bn),
        "network": medians(network),
        "tflite": medians(tflite),
        "ratios": {name: paired_ratio(samples, a, b) for name, (samples, a, b) in pairs.items()},
        "ratio_spread": {name: ratio_spread(samples, a, b)
                         for name, (samples, a, b) in pairs.items()},
        "application": medians(application),
        "large_application": medians(large),
        "sync_bn": medians(sync),
        "rounds": {"bn_layer": bn, "network": network, "tflite": tflite,  # ms, round by round
                   "application": application, "large_application": large, "sync_bn": sync},
        "shapes": {"bn_input": list(bn_shape), "network_input": [args.batch, *image],
                   "model": args.model, "width": args.width,
                   "application": {"arch": args.arch, "kwargs": _kwargs(args.arch_kwargs),
                                   "input": [args.arch_batch, *args.arch_image.split(",")]},
                   "large_application": {"arch": args.large_arch, "input": [
                       args.large_arch_batch, *args.large_arch_image.split(",")]},
                   "sync_bn": {"replicas": args.sync_replicas, "global_batch": args.batch}},
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU",
        "threads": args.threads or "tensorflow default",
        "tensorflow": tf.__version__,
        "method": f"median of {args.rounds} interleaved rounds x {args.steps} steps after 3 "
                  "warm-up steps; ratios: median of the per-round ratios, ratio_spread: "
                  "their 25th-75th percentiles; rounds: the per-round figures (ms)",
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))  # the file
    # has the per-round figures as well
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
