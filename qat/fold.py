"""Fold BN into the preceding conv/depthwise/dense: a BN-free Keras model, with a parity check.

For a BN after a linear layer (kernel W, bias b), per output channel c:
    s_c = gamma_c / sqrt(var_c + eps),   W'[..., c] = W[..., c] * s_c,
    b'_c = beta_c + (b_c - mu_c) * s_c
(depthwise: c runs over C·M output channels). gamma, beta, mu and var are the BN's *effective*
values: fake-quantized when its quant switch is on. A BN with nothing to fold into becomes a
per-channel scale and shift, a 1×1 depthwise conv (`ChannelAffine` on N×C): never dropped.
"""

from __future__ import annotations

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras

from qat.errors import ExportError
from qat.graph import rebuild
from qat.layers import ChannelAffine, QuantBatchNorm
from qat.quantize import LINEAR_KERNELS, depthwise_output_channels, folding_pairs


def bn_scale_shift(bn: QuantBatchNorm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, mu, beta) per channel from the BN's effective (possibly quantized) parameters."""
    gamma, beta, mean, variance = (t.numpy().astype(np.float64) for t in bn.effective_params())
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return scale, mean, beta


def fold_linear(kernel: np.ndarray, bias: np.ndarray | None, kind: str,
                bn: QuantBatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """Folded (kernel, bias) for one linear layer followed by `bn`."""
    scale, mean, beta = bn_scale_shift(bn)
    k = kernel.astype(np.float64)
    if kind == "DepthwiseConv2D":  # kh×kw×C×M: output channel c·M + m
        k = (np.asarray(depthwise_output_channels(k)) * scale).reshape(k.shape)
    else:
        k = k * scale
    b = np.zeros_like(scale) if bias is None else bias.astype(np.float64)
    return k.astype(np.float32), (beta + (b - mean) * scale).astype(np.float32)


def fold_batchnorms(model: tf_keras.Model) -> tf_keras.Model:
    """BN-free copy of a float model (no tfmot wrappers) with the same layer names."""
    pairs = folding_pairs(model)
    folded_into = {linear: bn for bn, linear in pairs.items()}

    def replace(layer):
        config = layer.get_config()
        if isinstance(layer, QuantBatchNorm):
            if layer.name in pairs:
                return None
            if len(layer.input_shape) == 4:
                return tf_keras.layers.DepthwiseConv2D(1, use_bias=True, name=layer.name)
            return ChannelAffine(name=layer.name)
        if layer.name in folded_into:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = rebuild(model, replace, name=f"{model.name}_folded")
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.InputLayer) or layer.name in pairs:
            continue
        target = folded.get_layer(layer.name)
        if layer.name in folded_into:
            kind = type(layer).__name__
            kernel = getattr(layer, LINEAR_KERNELS[kind]).numpy()
            bias = layer.bias.numpy() if getattr(layer, "use_bias", False) else None
            target.set_weights(list(fold_linear(kernel, bias, kind, model.get_layer(
                folded_into[layer.name]))))
        elif isinstance(layer, QuantBatchNorm):
            scale, mean, beta = bn_scale_shift(layer)  # a 1×1 depthwise kernel and its bias
            target.set_weights([scale.reshape(1, 1, -1, 1).astype(np.float32),
                                (beta - mean * scale).astype(np.float32)])
        else:
            target.set_weights(layer.get_weights())
    return folded


def dequantized_float_model(qmodel: tf_keras.Model, float_model: tf_keras.Model) -> tf_keras.Model:
    """Load a QAT model's weights into its float architecture, kernels as inference quantizes them.

    The result computes the QAT model minus activation fake-quant; BN switches are copied, so BN
    parameters stay quantized where they were. This is what folding starts from.
    """
    for wrapper in qmodel.layers:
        if not isinstance(wrapper, tfmot.quantization.keras.QuantizeWrapperV2):
            continue
        target = float_model.get_layer(wrapper.layer.name)
        # tfmot replaces the inner layer's kernel attribute with its quantized tensor, so the
        # wrapper, not the inner layer, tracks the variables: match them by name. A model
        # reloaded from .h5 scopes them under the wrapper ('quant_stem/kernel:0').
        source = {_inner_name(wrapper, w): w for w in wrapper.weights}
        quantized = {_inner_name(wrapper, weight): quantizer(weight, False, qvars)
                     for weight, quantizer, qvars in wrapper._weight_vars}
        for weight in target.weights:
            name = _short_name(weight)
            weight.assign(quantized[name] if name in quantized else source[name])
    return float_model


def _inner_name(wrapper, variable) -> str:
    """A wrapper's variable by the inner layer's name, as the float model's is named (a clone
    of a QAT model names the inner layer's variables with no scope at all: 'gamma:0')."""
    name = _short_name(variable)
    scope, _, rest = name.partition("/")
    if not rest:
        return f"{wrapper.layer.name}/{name}"
    return f"{wrapper.layer.name}/{rest}" if scope == wrapper.name else name


def _short_name(variable) -> str:
    """'block1a_conv/kernel:0' for a variable, whatever scopes enclose it."""
    return "/".join(variable.name.split("/")[-2:])


def parity(reference: tf_keras.Model, folded: tf_keras.Model, x: np.ndarray,
           tolerance: float) -> float:
    """Max |Δlogit| between the models in inference mode; raises above tolerance × max |logit|."""
    return check_parity(reference.predict(x, verbose=0, batch_size=256),
                        folded.predict(x, verbose=0, batch_size=256), tolerance)


def check_parity(ref: np.ndarray, out: np.ndarray, tolerance: float) -> float:
    """`parity` on logits already computed (export streams its evaluation batches)."""
    diff = float(np.max(np.abs(ref - out)))
    bound = tolerance * max(float(np.max(np.abs(ref))), 1.0)
    if not diff <= bound:
        raise ExportError(f"folded model differs from the unfolded one by {diff:.3g} (allowed "
                          f"{bound:.3g}): folding is wrong for this model, refusing to export")
    return diff
