"""Training-only augmentation as one tf.data map: random crop (padded or resized), flip,
brightness. tf.image ops on one image at a time; evaluation and export never see them."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from qat.config import AugmentConfig


def augmenter(cfg: AugmentConfig, seed: int) -> Callable:
    """(image, label) → (augmented image, label); each op its own seed (one shared seed makes
    their draws the same stream: flips and brightness shifts would move together)."""

    def augment(image, label):
        height, width, channels = image.shape
        if cfg.crop_scale_min < 1.0:  # ImageNet-style: a random area fraction, then resize
            begin, size, _ = tf.image.sample_distorted_bounding_box(
                tf.shape(image), tf.zeros([1, 0, 4]), seed=seed + 1,
                area_range=(cfg.crop_scale_min, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
                min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
            image = tf.image.resize(tf.slice(image, begin, size), (height, width))
        if cfg.crop_padding > 0:  # CIFAR-style: pad, then crop back to the original size
            pad = cfg.crop_padding
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="SYMMETRIC")
            image = tf.image.random_crop(image, (height, width, channels), seed=seed + 2)
        if cfg.flip:
            image = tf.image.random_flip_left_right(image, seed=seed + 3)
        if cfg.brightness > 0.0:
            image = tf.clip_by_value(
                tf.image.random_brightness(image, cfg.brightness, seed=seed + 4), 0.0, 1.0)
        return tf.ensure_shape(image, (height, width, channels)), label

    return augment
