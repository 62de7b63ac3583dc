"""Batches of decoded photos from ingest's TFRecords, and the training-only augmentation:
what fine-tune, evaluate and the scratch control feed their models (through images.decode_and_resize,
the one image path)."""
from __future__ import annotations

from pathlib import Path

from components import devices, images, records

SHUFFLE_BUFFER = 2048  # serialized photos held for shuffling; the whole split on small folders


def augmenter(params):
    """The training-only augmentation layers (None when all are off)."""
    import keras

    a = params.augment
    layers = []
    if a.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=params.seed))
    if a.rotation:
        layers.append(keras.layers.RandomRotation(a.rotation, seed=params.seed))
    if a.zoom:
        layers.append(keras.layers.RandomZoom(a.zoom, seed=params.seed))
    return keras.Sequential(layers, name="augment") if layers else None


def image_dataset(examples_dir: Path, split: str, image_size: int, batch_size: int,
                  shuffle_seed: int | None = None, augment=None, keys: bool = False):
    """(images [0, 255], labels[, keys]) batches of one split, decoded by the one image path."""
    import tensorflow as tf

    ds = records.dataset(examples_dir, split)
    if shuffle_seed is not None:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda ex: (images.decode_and_resize(ex[records.IMAGE], image_size), ex[records.LABEL])
                + ((ex[records.KEY],) if keys else ()),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    return devices.shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def split_batch_size(examples_dir: Path, split: str, placement: dict) -> int:
    """The global batch size, made to split evenly over several replicas (see devices.batch_for)."""
    replicas, global_batch = placement["replicas"], placement["global_batch_size"]
    if replicas == 1:
        return global_batch  # no need to count the photos
    return devices.batch_for(global_batch, replicas, records.count(examples_dir, split), f"fine-tune: {split} split")
