"""Export: fold BN, write SavedModel + float and full-int8 TFLite, evaluate the written files.

`python -m qat.export run.dir=DIR` does this for an existing run; `phase=quant|all` runs it last.
The int8 file is converted from the *folded* model re-wrapped with tfmot's quantizers and given
the activation ranges learned during QAT, so TFLite computes what the QAT model simulated.
Accuracy is measured on the written .tflite files with ai-edge-litert, not on the Keras graph.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from qat.config import ExportConfig, QATConfig, QuantConfig
from qat.data import Data, load_data
from qat.errors import ConfigError, ExportError, QatError, report_error
from qat.files import write_atomic, write_json
from qat.fold import check_parity, dequantized_float_model, fold_batchnorms
from qat.layers import QuantBatchNorm
from qat.lock import run_lock
from qat.ptq import simulated_ptq_model
from qat.quant_ops import int8_kernel_levels
from qat.quantize import (
    RANGE_FLOOR,
    UNFOLDED_KERNELS,
    ActivationQuantizer,
    DepthwiseKernelQuantizer,
    LayerQuantizeConfig,
    QuantizeLayer,
    depthwise_output_channels,
    folding_pairs,
    kept_relus,
    quantize_model,
    store_low_bits_as_int8,
    traced_for_the_converter,
    usable_range,
    wrappers,
)
from qat.rules import LAYER_RULES
from qat.runs import (
    build_float_model,
    build_quant_model,
    phase_dir,
    restore_float_weights,
    restore_model,
    tb_dir,
)
from qat.tflite_check import check_full_int8

EVAL_BATCH = 256
log = logging.getLogger("qat")


# -- conversion -------------------------------------------------------------------------------
def export_float_tflite(model: tf_keras.Model, path: str) -> int:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return write_atomic(path, _convert(converter, path))


def _convert(converter: tf.lite.TFLiteConverter, path: str) -> bytes:
    """The converter's bytes; its failure (an MLIR dump of many lines) as one ExportError line."""
    try:
        return converter.convert()
    except Exception as exc:  # ConverterError and friends: keep only the first error message
        text = str(exc)
        found = re.findall(r"error: ([^\n]*)", text)
        reason = (found[0] if found else text.strip().splitlines()[0] if text.strip() else
                  type(exc).__name__)
        raise ExportError(f"TFLite could not convert {os.path.basename(path)}: "
                          f"{reason[:300]}") from None


def _int8_converter(model: tf_keras.Model, int8_io: bool,
                    input_dtype: str = "int8") -> tf.lite.TFLiteConverter:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if int8_io:
        converter.inference_input_type = tf.uint8 if input_dtype == "uint8" else tf.int8
        converter.inference_output_type = tf.int8
    return converter


def export_int8_tflite(qmodel: tf_keras.Model, path: str, int8_io: bool,
                       input_dtype: str = "int8") -> int:
    """Full-integer file from a fake-quant model: ranges come from its FakeQuant ops."""
    with traced_for_the_converter(qmodel):
        data = _convert(_int8_converter(qmodel, int8_io, input_dtype), path)
    return write_atomic(path, data)


def export_ptq_tflite(model: tf_keras.Model, calibration: np.ndarray, path: str,
                      int8_io: bool) -> int:
    """Post-training quantization of a float model, calibrated on `calibration` images."""
    converter = _int8_converter(model, int8_io)
    converter.representative_dataset = lambda: ([x[None]] for x in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return write_atomic(path, _convert(converter, path))


# -- evaluation of written files ----------------------------------------------------------------
Inputs = np.ndarray | dict[str, np.ndarray]
Batches = Callable[[], Iterable[tuple[Inputs, np.ndarray]]]  # re-iterable: one pass per call


class TFLiteModel:
    """A .tflite file as a batch → float logits function; (de)quantizes int8 I/O with the
    file's params. Inputs: one array (one-input model) or arrays keyed by the Keras input
    names (the file's signature keeps them)."""

    def __init__(self, path: str, reference_kernels: bool = False,
                 input_grid: Callable[[str, np.ndarray], np.ndarray] | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.path = path
        # Int8 inputs: put each batch on the QAT model's input grid first (`qat_input_grid`),
        # so it gets the level the QAT model's FakeQuant picks. FakeQuant rounds
        # floor(x · (1/step) + 0.5) with a float32 inverse step, np.round(x / step) half to
        # even on a true division: at a value on a half step they can land one level apart
        # (a 4-bit input's pixel 0.5, 0.14 % of the digits values: agreement 0.986 instead of
        # 1.000 at w4a4 without 8-bit ends). `tflite_logits` keeps plain rounding.
        self.input_grid = input_grid
        # Reference kernels: TFLite's plain C++ ops instead of the default (XNNPACK) ones. Two
        # correct int8 runtimes may round differently; comparing them gives the noise floor.
        resolver = (OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO)
        self.runner = Interpreter(model_path=path, experimental_op_resolver_type=resolver
                                  ).get_signature_runner()
        self.inputs = self.runner.get_input_details()

    def __call__(self, x: Inputs) -> np.ndarray:
        if not isinstance(x, dict):
            if len(self.inputs) != 1:
                raise ExportError(f"{self.path} has inputs {sorted(self.inputs)}: pass a dict")
            x = {next(iter(self.inputs)): x}
        if set(x) != set(self.inputs):
            raise ExportError(f"{self.path} has inputs {sorted(self.inputs)}, the data {sorted(x)}")
        feed = {}
        for name, batch in x.items():
            batch = np.asarray(batch, np.float32)
            dtype = self.inputs[name]["dtype"]
            if dtype in (np.int8, np.uint8):
                if self.input_grid is not None:
                    batch = self.input_grid(name, batch)
                scale, zero = self.inputs[name]["quantization"]
                info = np.iinfo(dtype)
                batch = np.clip(np.round(batch / scale + zero), info.min, info.max).astype(dtype)
            feed[name] = batch
        ((name, y),) = self.runner(**feed).items()
        out = self.runner.get_output_details()[name]
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y


def array_batches(x: Inputs, y: np.ndarray, size: int = EVAL_BATCH) -> Batches:
    """In-memory arrays as evaluation batches (a dict of arrays is sliced per input)."""
    def take(start):
        if isinstance(x, dict):
            return {name: array[start:start + size] for name, array in x.items()}
        return x[start:start + size]

    return lambda: ((take(start), y[start:start + size]) for start in range(0, len(y), size))


def predict(model: Callable[[Inputs], np.ndarray], batches: Batches
            ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of one pass over `batches`; `model`: a batch → logits function."""
    (logits,), labels = predict_each([model], batches)
    return logits, labels


def predict_each(models: list[Callable[[Inputs], np.ndarray]], batches: Batches
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """([logits of each model], labels) from ONE pass over `batches`: a streamed validation
    set is read and decoded once for all the models compared on it."""
    outputs: list[list[np.ndarray]] = [[] for _ in models]
    labels = []
    for x, y in batches():
        for out, model in zip(outputs, models, strict=True):
            out.append(np.asarray(model(x)))
        labels.append(y)
    return [np.concatenate(out) for out in outputs], np.concatenate(labels)


def keras_logits(model: tf_keras.Model) -> Callable[[Inputs], np.ndarray]:
    return lambda x: model.predict_on_batch(x)


def tflite_logits(path: str, x: Inputs) -> np.ndarray:
    """Run a .tflite file on float inputs (arrays, or a dict of arrays by input name)."""
    count = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    return predict(TFLiteModel(path), array_batches(x, np.zeros(count)))[0]


def logit_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean |logits − reference| in units of the reference logits' standard deviation: how far
    the file is from the QAT model, beside how often their argmax agree."""
    return float(np.mean(np.abs(logits - reference)) / max(float(np.std(reference)), 1e-12))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


# -- ranges for the int8 graph --------------------------------------------------------------
def _input_index(model: tf_keras.Model, quantize_layer: QuantizeLayer) -> int:
    """Which of `model.inputs` an input quantizer rounds."""
    node = quantize_layer.inbound_nodes[0]  # one per layer the input feeds, the same input
    return model.input_names.index(node.inbound_layers.name)


def _input_key(model: tf_keras.Model, quantize_layer: QuantizeLayer) -> str:
    """An input's range is keyed by the input's position (auto-generated input names differ
    between builds): one range per input."""
    return f"input {_input_index(model, quantize_layer)}"


def qat_input_grid(qmodel: tf_keras.Model) -> Callable[[str, np.ndarray], np.ndarray]:
    """(input name, float batch) → the batch as the QAT model's input FakeQuant rounds it: on
    the int8 file's input grid, where converting to int8 levels is exact."""
    quantizers = {qmodel.input_names[_input_index(qmodel, layer)]: layer
                  for layer in qmodel.layers if isinstance(layer, QuantizeLayer)}

    def on_grid(name: str, batch: np.ndarray) -> np.ndarray:
        layer = quantizers.get(name)
        if layer is None and len(quantizers) == 1:  # one input: the file may name it otherwise
            (layer,) = quantizers.values()
        if layer is None:
            raise ExportError(f"the int8 file's input {name!r} is none of the QAT model's "
                              f"inputs {sorted(quantizers)}")
        return layer(tf.constant(batch), training=False).numpy()

    return on_grid


def _range_key(model: tf_keras.Model, layer) -> str:
    """The name a layer's ranges are matched by across the QAT and the folded model: the
    input's position for an input quantizer, else the (wrapped) layer's name."""
    if isinstance(layer, QuantizeLayer):
        return _input_key(model, layer)
    return getattr(getattr(layer, "layer", None), "name", layer.name)


def _aliased(name: str, aliases: dict[str, str], source: dict) -> str:
    """`name`, or the BN folded into it where the QAT model's entry is the BN's."""
    alias = aliases.get(name)
    return alias if source.get(alias) else name


def _copy_activation_ranges(source: tf_keras.Model, target: tf_keras.Model,
                            aliases: dict[str, str]) -> None:
    """Give the folded fake-quant model the activation ranges learned during QAT (by layer name).

    `aliases` maps a folded linear layer to its BN: when no ReLU follows, the QAT model quantized
    that tensor at the BN's output, which after folding is the linear layer's output.
    """
    def ranges(model):
        found = {}
        for layer in model.layers:
            key = _range_key(model, layer)
            kinds = {w.name.split(":")[0].rsplit("_", 1)[-1]: w for w in layer.weights
                     if "kernel" not in w.name}
            found[key] = {k: w for k, w in kinds.items() if k in ("min", "max", "seen")}
        return found

    src = ranges(source)
    for name, variables in ranges(target).items():
        name = _aliased(name, aliases, src)
        for short, var in variables.items():
            if name not in src or short not in src[name]:
                raise ExportError(f"no learned range for {name}/{short} in the QAT model: the "
                                  "folded graph does not match the trained one")
            value = src[name][short]
            if short in ("min", "max"):  # what the QAT forward used (learned ranges: clamped)
                value = usable_range(src[name]["min"], src[name]["max"])[short == "max"]
            var.assign(value)


def _set_kernel_ranges(qmodel: tf_keras.Model) -> None:
    """Kernel ranges = the folded kernel's own per-channel extent (what the converter stores).
    Folding starts from the dequantized kernels, so with quant.range=learned the extent already
    is the trained range: clipped to r × the float extent, the grid's last point.

    A b-bit kernel (b < 8) is stored as int8 values f = 127 // (2^(b-1) - 1) times its b-bit
    ones (f = 18 at 4 bits), on an f times finer step: the same numbers, but the file's int32
    bias (on input step × kernel step) and its requantization (TFLite's reference kernels round
    twice: onto 2^-shift of the output step, then onto the step) round f times finer. On the
    b-bit grid itself they moved ~5 % of a w4a4 conv's outputs by one step, and a 4-bit dense
    layer's 8-bit outputs by up to 3, which the QAT model does not compute."""
    for wrapper in qmodel.layers:
        if not isinstance(wrapper, tfmot.quantization.keras.QuantizeWrapperV2):
            continue
        for weight, quantizer, qvars in wrapper._weight_vars:
            kernel = weight.numpy()
            if isinstance(quantizer, DepthwiseKernelQuantizer):
                kernel = depthwise_output_channels(kernel).numpy()
            bound = np.maximum(np.abs(kernel.reshape(-1, kernel.shape[-1])).max(axis=0),
                               RANGE_FLOOR)
            if quantizer.num_bits < 8:  # the 8-bit narrow grid whose step is the b-bit one / f
                bound = bound * 127.0 / int8_kernel_levels(quantizer.num_bits)
                quantizer.num_bits = 8  # read when the converter traces the model
            if qvars["min_var"].shape.rank == 0:  # per-tensor kernel
                bound = bound.max()
            qvars["min_var"].assign(-bound)
            qvars["max_var"].assign(bound)


def check_exportable(quant: QuantConfig) -> None:
    """Refuse, before training, settings whose QAT model no int8 file can hold: more than 8
    bits (fewer are stored on an int8 grid, `store_low_bits_as_int8`)."""
    wide = [f"quant.{kind}" for kind in ("weight_bits", "activation_bits")
            if getattr(quant, kind) > 8]
    wide += [f"quant.layers.{pattern}.{kind}" for pattern, o in quant.layers.items()
             for kind in ("weight_bits", "activation_bits") if (getattr(o, kind) or 0) > 8]
    if wide:
        raise ConfigError(f"{wide[0]} above 8 cannot be exported to the full-int8 file: use at "
                          "most 8 bits, or phase=float/quant without export")


# -- the whole step -------------------------------------------------------------------------------
def export_run(settings: QATConfig, data: Data | None = None) -> dict:
    """Fold, export and evaluate the quant checkpoint of `settings.run.dir`; writes report.json.
    The files are evaluated on the validation stream (at most export.max_examples images)."""
    data = data or load_data(settings.data)
    # One float model: a second build could name auto-named layers differently (Keras counts
    # names per process), and export matches layers by name. quantize_model copies its weights.
    float_model = build_float_model(settings, data)
    qmodel = build_quant_model(settings, float_model)
    restore_model(qmodel, phase_dir(settings, "quant"), "quant")
    cap = settings.export.max_examples

    def batches():  # re-iterable: each evaluation pass streams the split again
        return data.val_batches(EVAL_BATCH, cap)

    ptq = (lambda staging: _ptq_baseline(settings, data, batches, staging)) if (
        settings.export.ptq) else None
    report = export_quant_model(qmodel, float_model, batches, None,
                                os.path.join(settings.run.dir, "export"), settings.export,
                                extra=ptq)
    _log_report(report, tb_dir(settings, "quant"))
    return report


def export_quant_model(qmodel: tf_keras.Model, float_model: tf_keras.Model,
                       x: Inputs | Batches, y: np.ndarray | None, out_dir: str,
                       export: ExportConfig,
                       extra: Callable[[str], dict] | None = None) -> dict:
    """Fold a trained QAT model, write SavedModel + float/int8 TFLite + report.json to `out_dir`
    and evaluate the written files on (x, y); `x`: an array, or one per input (list in
    `model.inputs` order, or dict by input name), or `Batches` (then `y` is None).
    `float_model`: a fresh float model of the same architecture (its weights are overwritten).
    The file quantizes each tensor and kernel as `qmodel`'s own quantizers do, so a reloaded or
    rebuilt QAT model exports as it was trained. `extra(staging_dir)` may add files and figures.
    `out_dir` is replaced only once everything is written: a failed export leaves it as it was.
    """
    _check_int8_bits(qmodel)
    if isinstance(x, list | tuple):  # one array per model input, in model.inputs order
        x = dict(zip(float_model.input_names, x, strict=True))
    batches = x if callable(x) else array_batches(x, y)
    unfolded = dequantized_float_model(qmodel, float_model)
    folded = fold_batchnorms(unfolded)
    # The converted model holds plain min/max ranges: learned ones are copied into them.
    aliases = {linear: bn for bn, linear in folding_pairs(unfolded).items()}  # linear → its BN
    qfolded = quantize_model(folded, _input_settings(qmodel),
                             keep_relus=kept_relus(qmodel),
                             configs=_folded_configs(qmodel, folded, aliases))
    store_low_bits_as_int8(qfolded)
    _copy_activation_ranges(qmodel, qfolded, aliases)
    _set_kernel_ranges(qfolded)
    (qat_logits, unfolded_logits, folded_logits), labels = predict_each(
        [keras_logits(m) for m in (qmodel, unfolded, folded)], batches)
    fold_diff = check_parity(unfolded_logits, folded_logits, export.fold_tolerance)

    staging = f"{out_dir}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        report = {"fold_max_abs_diff": fold_diff, "eval_examples": len(labels),
                  **_write_files(folded, qfolded, batches, labels, qat_logits, export, staging,
                                 qat_input_grid(qmodel))}
        if extra is not None:
            report.update(extra(staging))
        write_json(os.path.join(staging, "report.json"), report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return report


def _folded_configs(qmodel: tf_keras.Model, folded: tf_keras.Model,
                    aliases: dict[str, str]) -> dict[str, LayerQuantizeConfig]:
    """The QAT model's own quantization, layer by layer, for the folded model the converter
    reads, so the file cannot round a tensor or kernel other than QAT did (an export re-planned
    from a QuantConfig wrote a w4a4 model's tensors at 8 bits when given the default one:
    agreement 0.89). A folded linear layer's output is its BN's (`aliases`), quantized as the
    BN's was; its kernel is no longer folded at training time. A BN with nothing to fold into
    is a 1×1 depthwise conv (or `ChannelAffine`) there: its multiplier, one value per channel,
    is exact at any bits, and 8 bits gives the int32 bias grid QAT computes (qat.bias_grid).
    Ranges are plain min/max: learned ones are copied into them (`_copy_activation_ranges`)."""
    # The configs are part of each wrapper's Keras config: a reloaded or cloned model has them.
    wrapped = wrappers(qmodel)
    trained = {name: wrapper.quantize_config for name, wrapper in wrapped.items()}
    lone_bns = {name for name, wrapper in wrapped.items()
                if isinstance(wrapper.layer, QuantBatchNorm) and name not in aliases.values()}
    configs = {}
    for layer in folded.layers:
        if isinstance(layer, tf_keras.layers.InputLayer):
            continue
        own = trained.get(layer.name, LayerQuantizeConfig())
        output = trained.get(aliases.get(layer.name), own)
        kernel = {"kernel_attr": own.kernel_attr, "weight_bits": own.weight_bits,
                  "kernel": UNFOLDED_KERNELS.get(own.kernel, own.kernel)}
        if layer.name in lone_bns and not own.skipped:
            kernel_attr, kind = LAYER_RULES[type(layer).__name__].kernel
            kernel = {"kernel_attr": kernel_attr, "kernel": kind, "weight_bits": 8}
        configs[layer.name] = LayerQuantizeConfig(
            **kernel, output_bits=output.output_bits, ema_decay=output.ema_decay,
            relu=output.relu, cap=output.cap, output_range=output.output_range,
            concat_range=output.concat_range, skipped=own.skipped or output.skipped)
    return configs


def _input_settings(qmodel: tf_keras.Model) -> QuantConfig:
    """A QuantConfig whose input quantizer is the QAT model's (bits, fixed range); the layers'
    plan comes from `_folded_configs`."""
    inputs = [layer.quantizer for layer in qmodel.layers if isinstance(layer, QuantizeLayer)]
    quantizer = inputs[0] if inputs else ActivationQuantizer()
    return QuantConfig(activation_bits=quantizer.num_bits, ends_8_bits=False,
                       input_range=list(quantizer.fixed_range) if quantizer.fixed_range else None)


def _check_int8_bits(qmodel: tf_keras.Model) -> None:
    """Stop in one line where a quantizer of `qmodel` has more bits than an int8 file holds:
    the CLI refuses such settings before training (`check_exportable`), a model quantized
    through the API meets this check at export."""
    for layer in qmodel.layers:
        quantizers = [*(getattr(layer, "_output_quantizers", None) or []),
                      *(q for _, q, _ in getattr(layer, "_weight_vars", None) or [])]
        if isinstance(layer, QuantizeLayer):
            quantizers.append(layer.quantizer)
        wide = [q.num_bits for q in quantizers if getattr(q, "num_bits", 8) > 8]
        if wide:
            raise ExportError(f"{layer.name} is quantized to {wide[0]} bits, more than the "
                              "full-int8 file holds: quantize it with at most 8 bits to export")


def _write_files(folded: tf_keras.Model, qfolded: tf_keras.Model, batches: Batches,
                 labels: np.ndarray, qat_logits: np.ndarray, export: ExportConfig,
                 staging: str, input_grid: Callable[[str, np.ndarray], np.ndarray]) -> dict:
    """Write the model files into `staging`, check the int8 one, evaluate both."""
    folded.save(os.path.join(staging, "saved_model"), save_format="tf")
    float_path, int8_path = (os.path.join(staging, f) for f in ("model_float.tflite",
                                                                "model_int8.tflite"))
    float_bytes = export_float_tflite(folded, float_path)
    int8_bytes = export_int8_tflite(qfolded, int8_path, export.int8_io, export.input_dtype)
    # Stops here, before any evaluation, unless the file is full-int8 (or allowed not to be).
    inspection = check_full_int8(int8_path, export.int8_io, export.allow_float_ops)
    if not inspection.full_int8:
        log.warning("export.allow_float_ops=true: model_int8.tflite keeps %d float op(s): %s",
                    len(inspection.float_ops), ", ".join(inspection.float_ops[:5]))
    (float_logits, int8_logits), _ = predict_each(
        [TFLiteModel(float_path), TFLiteModel(int8_path, input_grid=input_grid)], batches)
    return {
        "qat_val_accuracy": accuracy(qat_logits, labels),
        "tflite_float_accuracy": accuracy(float_logits, labels),
        "tflite_int8_accuracy": accuracy(int8_logits, labels),
        "int8_agreement": float(np.mean(np.argmax(int8_logits, -1) == np.argmax(qat_logits, -1))),
        "int8_logit_error": logit_error(int8_logits, qat_logits),
        "float_bytes": float_bytes,
        "int8_bytes": int8_bytes,
        "int8_float_tensors": inspection.float_tensors,
        "int8_float_ops": inspection.float_ops,
    }


def _ptq_baseline(settings: QATConfig, data: Data, batches: Batches, out_dir: str) -> dict:
    """The float checkpoint quantized without training: TFLite's own PTQ (an int8 file, 8 bits)
    and PTQ simulated at the run's precision plan (`qat.ptq`: the baseline below 8 bits)."""
    float_model = build_float_model(settings, data)
    restore_float_weights(settings, float_model)
    n = min(data.train_examples,
            settings.export.calibration_batches * settings.trainer.batch_size)
    calibration = data.sample_train(n, settings.data.seed)
    simulated = simulated_ptq_model(float_model, settings.model_quant(), calibration,
                                    settings.trainer.batch_size)
    path = os.path.join(out_dir, "model_ptq_int8.tflite")
    size = export_ptq_tflite(fold_batchnorms(float_model), calibration, path,
                             settings.export.int8_io)
    (file_logits, simulated_logits), labels = predict_each(
        [TFLiteModel(path), keras_logits(simulated)], batches)
    return {"ptq_int8_accuracy": accuracy(file_logits, labels), "ptq_int8_bytes": size,
            "ptq_simulated_accuracy": accuracy(simulated_logits, labels)}


def _log_report(report: dict, log_dir: str) -> None:
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "export"))
    with writer.as_default():
        for key, value in report.items():
            if not isinstance(value, numbers.Real):  # the float tensor/op lists
                continue
            tf.summary.scalar(f"export/{key}", value, step=0)
    writer.flush()


def main(argv: list[str] | None = None) -> int:
    """`python -m qat.export run.dir=DIR [overrides]`: the run's own config, then overrides."""
    from qat.cli import compose_for_run

    try:
        settings = compose_for_run(argv if argv is not None else sys.argv[1:])
        with run_lock(settings.run.dir, "python -m qat.export"):
            report = export_run(settings)
    except QatError as exc:
        return report_error(exc)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
