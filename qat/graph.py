"""Keras graph plumbing shared by conversion, quantization rules and folding.

`rebuild` re-creates any graph-network model (functional, or Sequential built on an Input) as
ONE flat functional model, node by node: nested models used as layers are inlined, shared layers
stay shared, and each call's own arguments are replayed (constants and keywords included, as the
`TFOpLambda` layers of keras.applications need). Subclassed models have no graph to walk: they
are refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tf_keras

from qat.errors import ConfigError

# The replacement of a layer: a layer (called like the original), any callable taking the
# original call's arguments (to rewrite a layer into others), or None (drop: input passes on).
Replace = Callable[[tf_keras.layers.Layer], "Callable | None"]


def is_keras_tensor(value) -> bool:
    """A symbolic tensor of a functional graph (not a constant argument)."""
    return hasattr(value, "_keras_history") and tf_keras.backend.is_keras_tensor(value)


def require_graph_network(model: tf_keras.Model) -> None:
    """A model qat can read layer by layer: functional, or Sequential with a known input."""
    if not getattr(model, "_is_graph_network", False):
        raise ConfigError(
            f"model {model.name!r} ({type(model).__name__}) is a subclassed model (or a Sequential "
            "without an input shape): qat needs its layer graph; build it with the functional "
            "API (tf_keras.Input(...) -> layers -> tf_keras.Model) or give the Sequential an Input")


def _replay(model: tf_keras.Model, inputs: list, replace: Replace, made: dict) -> list:
    """Call the replacement of every node of `model` on `inputs`; returns its new outputs."""
    tensors = {id(old): new for old, new in zip(model.inputs, inputs, strict=True)}
    for depth in sorted(model._nodes_by_depth, reverse=True):  # deepest = nearest the inputs
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            layer = node.outbound_layer
            args, kwargs = tf.nest.map_structure(
                lambda t: tensors[id(t)] if is_keras_tensor(t) else t,
                (node.call_args, node.call_kwargs))
            if isinstance(layer, tf_keras.Model):
                require_graph_network(layer)
                outputs = _replay(layer, tf.nest.flatten(args[0]), replace, made)
                outputs = outputs[0] if len(outputs) == 1 else outputs
            else:
                if id(layer) not in made:  # a shared layer is replaced once, called per node
                    made[id(layer)] = replace(layer)
                new = made[id(layer)]
                outputs = tf.nest.flatten(args)[0] if new is None else new(*args, **kwargs)
            for old, new_tensor in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs),
                                       strict=True):
                tensors[id(old)] = new_tensor
    return [tensors[id(t)] for t in model.outputs]


def rebuild(model: tf_keras.Model, replace: Replace, name: str | None = None) -> tf_keras.Model:
    """One flat functional copy of `model` built from `replace(layer)` for every layer.

    `replace` returns the layer to call in its place (a fresh copy, a substitute, or the layer
    itself to share it), a function of the original call's arguments that returns the outputs,
    or None to drop it (its first input passes through). Nested models are inlined. Weights are
    whatever the new layers hold: copy them after, by name.
    """
    require_graph_network(model)
    inputs = [tf_keras.Input(type_spec=t.type_spec, name=name)
              for t, name in zip(model.inputs, model.input_names, strict=True)]
    outputs = _replay(model, inputs, replace, {})
    return tf_keras.Model(inputs if len(inputs) > 1 else inputs[0],
                          outputs if len(outputs) > 1 else outputs[0], name=name or model.name)


def copy_layer(layer: tf_keras.layers.Layer) -> tf_keras.layers.Layer:
    """A fresh layer of the same class and config (weights are created when it is called)."""
    return layer.__class__.from_config(layer.get_config())


def flat_layers(model: tf_keras.Model) -> list[tf_keras.layers.Layer]:
    """Every non-model layer, looking inside nested models, in graph order."""
    found = []
    for layer in model.layers:
        found.extend(flat_layers(layer) if isinstance(layer, tf_keras.Model) else [layer])
    return found


def consumers(layer) -> list:
    return [node.outbound_layer for node in layer._outbound_nodes]


def producers(layer) -> list:
    return [p for node in layer._inbound_nodes for p in tf.nest.flatten(node.inbound_layers)]
