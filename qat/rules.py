"""Quantization rules: what each layer kind is in the int8 graph, as a declarative table.

Every layer gets one of three output roles, chosen from what TFLite computes for it:
  * QUANTIZE — an int8 op with an output range of its own (conv, add, mul, pooling average,
    logistic, hard-swish, ...): the QAT model fake-quantizes its output, unless the next layer
    fuses into it (a BN folded into its conv, RELU/RELU6 fused into the op before them);
  * RELU — a ReLU (plain or capped at 6): computed by the output range of the op it fuses into,
    and by its own range pinned at 0;
  * PASS — int8 in, the same grid out (max pooling, padding, reshapes, dropout): no quantizer.
Layers with a kernel also name the kernel attribute and its quantizer kind. A kind that is not
in the table has no rule: `rule_for` returns None and quantization stops with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZE, RELU, PASS = "quantize", "relu", "pass"


@dataclass(frozen=True)
class Rule:
    output: str  # QUANTIZE | RELU | PASS
    kernel: tuple[str, str] | None = None  # (attribute, quantizer kind)
    # An int8 op whose output grid TFLite fixes (LOGISTIC: scale 1/256, zero point -128): the
    # QAT model rounds onto that grid, as the file does; any other range makes the converter
    # append a requantizing op, which rounds a second time.
    fixed_range: tuple[float, float] | None = None


# The int8 output grids TFLite's kernels fix (their Prepare checks), as [min, max] ranges of
# an 8-bit FakeQuant: 256 levels from 0 in steps of 1/256, and from -1 in steps of 1/128.
UNIT_GRID = (0.0, 255.0 / 256.0)  # LOGISTIC, SOFTMAX
TANH_GRID = (-1.0, 127.0 / 128.0)  # TANH


LAYER_RULES = {
    "Conv2D": Rule(QUANTIZE, ("kernel", "per_channel")),
    "DepthwiseConv2D": Rule(QUANTIZE, ("depthwise_kernel", "depthwise")),
    # Per tensor: the converter rejects a per-channel FakeQuant on a Keras dense kernel.
    "Dense": Rule(QUANTIZE, ("kernel", "per_tensor")),
    # What an N×C BN with nothing to fold into becomes in exported models (qat.layers).
    "ChannelAffine": Rule(QUANTIZE, ("kernel", "depthwise")),
    "QuantBatchNorm": Rule(QUANTIZE),
    **{kind: Rule(QUANTIZE) for kind in (
        "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate",
        "GlobalAveragePooling2D", "Rescaling", "ScalarArithmetic")},
    "Softmax": Rule(QUANTIZE, fixed_range=UNIT_GRID),
    # AVERAGE_POOL_2D is a same-scale op in TFLite int8 (the converter refuses an output range
    # of its own), like max pooling, padding and reshapes.
    **{kind: Rule(PASS) for kind in (
        "MaxPooling2D", "AveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Reshape", "Dropout",
        "SpatialDropout2D", "ZeroPadding2D", "Cropping2D", "Permute", "SlicingOpLambda")},
}

# Activation layers (and `tf.nn.*` calls) by function name. Each QUANTIZE one is an int8 op:
# LOGISTIC, TANH, HARD_SWISH, SOFTMAX, GELU. swish/silu is LOGISTIC + MUL in the file, and
# `qat.convert` rewrites it as those two layers, so the sigmoid's fixed grid is modelled (a
# swish left as one layer, e.g. built after conversion, still gets an output range). (ELU has
# no int8 kernel the converter uses: no rule, so it is refused before training.)
ACTIVATION_RULES = {
    "linear": Rule(PASS), "relu": Rule(RELU), "relu6": Rule(RELU),
    "sigmoid": Rule(QUANTIZE, fixed_range=UNIT_GRID),
    "softmax": Rule(QUANTIZE, fixed_range=UNIT_GRID),
    "tanh": Rule(QUANTIZE, fixed_range=TANH_GRID),
    **{name: Rule(QUANTIZE) for name in (
        "swish", "silu", "hard_sigmoid", "hard_silu", "hard_swish", "gelu")},
}

# TFOpLambda layers (tf ops called on Keras tensors, as keras.applications do) by function:
# only those that pass their input's grid on. tfmot cannot wrap a TFOpLambda, so one that
# needs a quantizer is refused (qat.quantize); `qat.convert` rewrites the common ones (
# arithmetic, sigmoid, tanh, relu, swish, spatial mean) as Keras layers first.
TF_OP_RULES = {name: Rule(PASS) for name in ("reshape", "__operators__.getitem",
                                             "compat.v1.squeeze", "expand_dims", "identity")}


def activation_name(layer) -> str | None:
    """The activation an `Activation` or `ReLU` layer applies."""
    kind = type(layer).__name__
    if kind == "Activation":
        return layer.get_config()["activation"]
    if kind == "ReLU":
        config = layer.get_config()
        if config["negative_slope"] or config["threshold"]:
            return None
        return {None: "relu", 6.0: "relu6"}.get(
            None if config["max_value"] is None else float(config["max_value"]))
    return None


# Built-in activations TFLite fuses into the op (or that are no op): kept inside the layer.
FUSED_ACTIVATIONS = ("linear", "relu", "relu6")


def rule_for(layer) -> Rule | None:
    """The rule of one layer, or None when qat has none for it."""
    kind = type(layer).__name__
    if kind == "Activation":
        return ACTIVATION_RULES.get(layer.get_config()["activation"])
    if kind == "TFOpLambda":
        return TF_OP_RULES.get(layer.get_config()["function"])
    if kind == "ReLU":  # capped (other than 6), leaky or thresholded: an op of its own
        return Rule(RELU) if activation_name(layer) else Rule(QUANTIZE)
    return LAYER_RULES.get(kind)


def is_fusable_relu(layer) -> bool:
    """RELU or RELU6, which TFLite fuses into the op before it. Leaky or thresholded ReLUs are
    ops of their own (LEAKY_RELU, ...) and need their input on an int8 grid."""
    return activation_name(layer) in ("relu", "relu6")


def relu_cap(layer) -> float | None:
    """The top a fusable ReLU clamps at: 6 for RELU6, None for a plain ReLU (and any other layer).
    A fake-quant range pinned at 0 whose top stays <= the cap computes the ReLU (see
    `qat.quantize.FusedReLU`)."""
    return 6.0 if activation_name(layer) == "relu6" else None


def output_starts_at_zero(layer) -> bool:
    """Outputs are >= 0 (any ReLU without a leak): its range is pinned at 0."""
    if type(layer).__name__ == "ReLU":
        return not layer.get_config()["negative_slope"]
    return activation_name(layer) in ("relu", "relu6")


# TFLite ops that carry a fused RELU/RELU6.
FUSES_RELU = ("Conv2D", "DepthwiseConv2D", "Dense", "ChannelAffine", "QuantBatchNorm", "Add")


def known_kinds() -> list[str]:
    return sorted({*LAYER_RULES, "Activation", "ReLU"})
