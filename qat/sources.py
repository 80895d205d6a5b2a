"""Model sources: where the float model comes from, always returned with qat's BN.

  * built-in: `model=convnet|resnet|mobilenet` (qat.models);
  * `model=keras model.arch=NAME`: a tf_keras.applications constructor, built for the data's
    input shape and class count with `weights=None` (or `model.weights=PATH`, a local file);
  * `model=target model.target=package.module:function`: the user's builder, called as
    `function(input_shape, num_classes, **model.kwargs)`;
  * `model=file model.path=PATH`: a saved float model (.keras, .h5, SavedModel directory).
Every external model goes through `qat.convert` (Keras BN → qat BN, nested models inlined), and
its outputs are made logits: a final softmax is dropped (argmax is unchanged, the loss is taken
from logits, and the int8 file then ships logits).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os

import tf_keras

from qat.config import BUILTIN_MODELS, ModelConfig
from qat.convert import convert_batchnorms
from qat.errors import ConfigError
from qat.graph import rebuild
from qat.layers import synchronize_batchnorms
from qat.models import build_model

log = logging.getLogger("qat")


def keras_application(cfg: ModelConfig, input_shape: tuple[int, ...],
                      num_classes: int) -> tf_keras.Model:
    """`tf_keras.applications.<arch>` with logits, for this data; no download ever."""
    constructor = getattr(tf_keras.applications, cfg.arch or "", None)
    if not callable(constructor) or not cfg.arch[:1].isupper():
        names = [n for n in dir(tf_keras.applications) if n[:1].isupper()]
        close = difflib.get_close_matches(cfg.arch or "", names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model.arch={cfg.arch} is not a tf_keras.applications model{hint}")
    kwargs = {"input_shape": tuple(input_shape), "classes": num_classes, "weights": None,
              "classifier_activation": None, **cfg.kwargs}
    try:
        model = constructor(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tf_keras.applications.{cfg.arch}(**{kwargs}) failed: "
                          f"{str(exc).splitlines()[0]}") from exc
    if cfg.weights:
        _load_weights(model, cfg.weights)
    return model


def _load_weights(model: tf_keras.Model, path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"model.weights={path} does not exist: give a local weights file")
    try:
        model.load_weights(path)
    except Exception as exc:  # h5py/TF raise many types for a wrong or damaged file
        raise ConfigError(f"model.weights={path} does not fit {model.name} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc


def user_target(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int):
    """The user's `package.module:function(input_shape, num_classes, **kwargs)`."""
    module_name, _, function_name = (cfg.target or "").partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.target={cfg.target} cannot be imported ({exc}): check the "
                          "module is on PYTHONPATH and the function name") from exc
    model = function(tuple(input_shape), num_classes, **cfg.kwargs)
    if not isinstance(model, tf_keras.Model):
        raise ConfigError(f"model.target={cfg.target} returned {type(model).__name__}, not a "
                          "tf_keras model (build it with tf_keras, not keras 3)")
    return model


def saved_model_file(cfg: ModelConfig) -> tf_keras.Model:
    """A saved float model, loaded without its optimizer state."""
    path = cfg.path or ""
    if not os.path.exists(path):
        raise ConfigError(f"model.path={path} does not exist")
    try:
        model = tf_keras.models.load_model(path, compile=False)
    except Exception as exc:  # corrupt file, custom objects, keras 3 file...
        raise ConfigError(f"model.path={path} could not be loaded as a tf_keras model "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(model, tf_keras.Model):
        raise ConfigError(f"model.path={path} holds no Keras model (a bare SavedModel?): save "
                          "it with model.save(...) from tf_keras")
    return model


def _check_fits_data(model: tf_keras.Model, input_shape: tuple[int, ...],
                     num_classes: int) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(f"model {model.name} has {len(model.inputs)} inputs and "
                          f"{len(model.outputs)} outputs: qat trains image classifiers with one "
                          "of each")
    expected = tuple(model.input_shape[1:])
    fits = len(expected) == len(input_shape) and all(
        e is None or e == d for e, d in zip(expected, input_shape, strict=True))
    if not fits:
        raise ConfigError(f"model {model.name} takes inputs of shape {expected}, the data is "
                          f"{tuple(input_shape)}: set data.image_size (or pick data matching "
                          "the model)")
    if model.output_shape[-1] != num_classes:
        raise ConfigError(f"model {model.name} outputs {model.output_shape[-1]} classes, the "
                          f"data has {num_classes}")


def as_logits(model: tf_keras.Model) -> tf_keras.Model:
    """The same model with a final softmax removed (the layer, or a layer's activation)."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", None)
    if type(last).__name__ == "Softmax" or (
            type(last).__name__ == "Activation" and name == "softmax"):
        log.info("model %s: final softmax dropped, the model outputs logits", model.name)
        return tf_keras.Model(model.inputs, last.input, name=model.name)
    if name == "softmax":
        log.info("model %s: %s's softmax dropped, the model outputs logits", model.name, last.name)

        def replace(layer):
            if layer is not last:
                return layer  # shared with `model`: weights stay in place
            config = layer.get_config()
            config["activation"] = "linear"
            return layer.__class__.from_config(config)

        logits = rebuild(model, replace)
        logits.get_layer(last.name).set_weights(last.get_weights())
        return logits
    return model


def load_float_model(cfg: ModelConfig, input_shape: tuple[int, ...],
                     num_classes: int) -> tf_keras.Model:
    """The configured float model with qat's BN, outputting logits, checked against the data."""
    if cfg.name in BUILTIN_MODELS:
        model = build_model(cfg, input_shape, num_classes)
    else:
        if cfg.name == "keras":
            model = keras_application(cfg, input_shape, num_classes)
        elif cfg.name == "target":
            model = user_target(cfg, input_shape, num_classes)
        else:
            model = saved_model_file(cfg)
        _check_fits_data(model, input_shape, num_classes)
        model = convert_batchnorms(as_logits(model))
    if cfg.sync_bn:
        synchronize_batchnorms(model)
    return model

