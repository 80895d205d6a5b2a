"""The run directory and its checkpoints: where each phase writes, which float checkpoint the
quant phase starts from, and how a model is built and restored from them. Used by the phases
and by the export alike, so the export never reaches up into the phases to rebuild a model.
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf
import tf_keras

from qat.config import QATConfig
from qat.data import Data
from qat.errors import CheckpointError
from qat.quantize import quantize_model
from qat.sources import load_float_model

log = logging.getLogger("qat")


def phase_dir(settings: QATConfig, phase: str) -> str:
    return os.path.join(settings.run.dir, phase)


def tb_dir(settings: QATConfig, phase: str) -> str:
    return os.path.join(settings.run.dir, "tb", phase)


def float_checkpoint_dir(settings: QATConfig) -> str:
    return settings.quant.init_from or phase_dir(settings, "float")


def build_float_model(settings: QATConfig, data: Data) -> tf_keras.Model:
    return load_float_model(settings.model, data.input_shape, data.num_classes)


def restore_float_weights(settings: QATConfig, float_model: tf_keras.Model) -> None:
    """The float checkpoint's weights; `model=file` without one starts from the file itself."""
    directory = float_checkpoint_dir(settings)
    has_checkpoint = os.path.isdir(directory) and tf.train.latest_checkpoint(directory)
    if settings.model.name == "file" and not settings.quant.init_from and not has_checkpoint:
        log.info("quant phase: no float checkpoint in %s, starting from %s", directory,
                 settings.model.path)
        return
    restore_model(float_model, directory, "float")


def restore_model(model: tf_keras.Model, directory: str, what: str) -> str:
    """Restore `model`'s variables from the newest checkpoint in `directory`, or fail clearly."""
    path = tf.train.latest_checkpoint(directory) if os.path.isdir(directory) else None
    if path is None:
        raise CheckpointError(f"no {what} checkpoint in {directory}: run the {what} phase first"
                              + (" or set quant.init_from=DIR" if what == "float" else ""))
    try:
        status = tf.train.Checkpoint(model=model).read(path)
        status.assert_existing_objects_matched().expect_partial()
    except (ValueError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{what} checkpoint {path} does not fit this model ({first}): use "
                              "the model/data config it was trained with") from exc
    except Exception as exc:  # DataLossError, short reads (IndexError), ...: unreadable files
        raise CheckpointError(f"{what} checkpoint {path} is corrupt or truncated "
                              f"({type(exc).__name__}): rerun the {what} phase with "
                              "run.overwrite=true") from exc
    return path


def build_quant_model(settings: QATConfig, float_model: tf_keras.Model) -> tf_keras.Model:
    """tfmot-wrapped copy of `float_model` with qat's BN switched into quantized mode."""
    return quantize_model(float_model, settings.model_quant())
