"""Fine-tuning from cached activations: the frozen part of the base runs once per photo and view.

Base layers below ``fine_tune_at`` never change in fine-tuning, and BatchNorm
runs in inference mode, so what they compute from a photo is fixed. The base
is cut where exactly one tensor flows from the frozen layers into the rest (at
or below ``fine_tune_at``, and not much wider than the narrowest such tensor
there; MobileNetV2 at 100: before ``block_11_expand``, index 98). ``front``
(image -> that tensor) runs once per photo and view, its outputs are cached
per photo (components/vector_cache.py) as float16, and an epoch runs only
``top`` (that tensor -> pooled features, the layers from the cut up, sharing
their weights with the base) and the head. Frozen layers between the cut and
``fine_tune_at`` stay frozen inside ``top``.

Views are what augmentation can still be when the frozen part is cached: the
photo as it is and mirrored (``images.view``), each a cached activation; an
epoch shows every photo once, in one of its views picked at random.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterator

import numpy as np

from components import base_models, images

# Activations are stored and held in memory as float16: half the bytes, and the
# first layers after the cut (a 1x1 convolution and BatchNorm) see no difference
# beyond 1e-3 relative (tests/test_activations.py).
STORED_DTYPE = np.float16


# A cut may hold an activation at most this many times the narrowest one at or below fine_tune_at.
MAX_CUT_WIDTH = 2


def cut_index(base, fine_tune_at: int) -> int:
    """The largest c <= fine_tune_at where exactly one tensor crosses from base layers < c to layers >= c,
    and that tensor is at most MAX_CUT_WIDTH times the smallest such tensor at or below fine_tune_at.

    The size rule keeps the cache small: MobileNetV2 at fine_tune_at 56 would otherwise cache
    block_6's expanded 192 channels (6x the 32 of block_5's output, 2 cuts below) for every photo
    and view.
    """
    layers = base.layers
    position = {id(layer): i for i, layer in enumerate(layers)}
    last_use = {}  # producer layer index -> index of the last layer that reads its output
    for i, layer in enumerate(layers):
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = position[id(tensor._keras_history.operation)]
                last_use[producer] = max(last_use.get(producer, -1), i)
    final = position[id(base.outputs[0]._keras_history.operation)]
    last_use[final] = len(layers)
    sizes = {}  # candidate cut -> elements of the one tensor crossing it
    for c in range(min(max(fine_tune_at, 1), len(layers)), 0, -1):
        crossing = [p for p, used in last_use.items() if p < c <= used]
        if len(crossing) == 1:
            sizes[c] = int(np.prod(layers[crossing[0]].output.shape[1:]))
    if not sizes:
        return 1  # the input layer's output: the preprocessed image itself
    narrowest = min(sizes.values())
    return max(c for c, size in sizes.items() if size <= MAX_CUT_WIDTH * narrowest)


def split(extractor, fine_tune_at: int):
    """(front, top, cut): image [0, 255] -> activation at the cut; activation -> pooled features; the cut index.

    ``top`` shares its layers with ``extractor``'s base, so training it trains the
    model that is exported. The extractor's input block must have no noise (it
    would make the frozen part random): fine-tune takes the image path then.
    """
    import keras

    base = base_models.base_of(extractor)
    cut = cut_index(base, fine_tune_at)
    tensor = base.layers[cut - 1].output
    inner_front = keras.Model(base.inputs, tensor, name="frozen_front")
    image = keras.Input(extractor.input_shape[1:], name="image")
    x = image
    for layer in extractor.layers[1:]:
        if layer is base:
            break
        x = layer(x)
    front = keras.Model(image, inner_front(x), name="front")
    top = keras.Model(tensor, base.outputs[0], name="top")
    return front, top, cut


def fingerprint(base_fingerprint: str, cut_layer: str, view: str) -> str:
    """The cache folder of one cut and view, under the base's feature fingerprint."""
    spec = {"base": base_fingerprint, "cut": cut_layer, "view": view, "view_version": images.VIEW_VERSION,
            "dtype": np.dtype(STORED_DTYPE).name}
    base_name = base_fingerprint.rsplit("-", 1)[0]  # base_models.cache_fingerprint: "<base>-<hash>"
    return f"activations-{base_name}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def views_for(augment) -> tuple[str, ...]:
    """The views fine-tuning caches per training photo: the photo, and its mirror when augment.flip is on."""
    return images.VIEWS if augment.flip else images.VIEWS[:1]


def compute(front, examples_dir, split: str, views, image_size: int, caches: dict, batch_size: int):
    """(activations [n, views, *shape] float16, labels [n] int64) of one split, cached per photo and view.

    ``caches``: view -> VectorCache, or None to keep nothing on disk. Photos whose
    activations are cached are read; the others are decoded once and run through ``front``
    in batches of ``batch_size`` views, each photo's views together (so recomputed values depend
    on the batch in their last bits; see features.RECOMPUTED_ATOL).
    """
    import tensorflow as tf
    from tqdm import tqdm

    from components import records

    shape = tuple(int(d) for d in front.output_shape[1:])

    # Each photo is decoded once, and its views go through ``front`` as one batch (view by view).
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def run(image_bytes):
        decoded = images.decode_batch(image_bytes, image_size)
        return front(tf.concat([images.view(decoded, name) for name in views], axis=0), training=False)

    rows, labels, pending = [], [], []
    computed = 0

    def flush():
        nonlocal computed
        if not pending:
            return
        out = run(tf.constant([data for _, _, data, _ in pending])).numpy().astype(STORED_DTYPE)
        out = out.reshape((len(views), len(pending)) + shape)
        for i, (row, sha, _, missing) in enumerate(pending):
            for v in missing:  # a view already cached keeps its cached value
                rows[row][v] = out[v, i]
                if caches.get(views[v]) is not None:
                    caches[views[v]].put(sha, out[v, i])
            computed += len(missing)
            bar.update(len(missing))
        pending.clear()

    with tqdm(desc=f"fine-tune: {split} activations ({' + '.join(views)})", unit="view") as bar:
        for example in records.dataset(examples_dir, split):
            data = example[records.IMAGE].numpy()
            sha = hashlib.sha256(data).hexdigest()
            row = len(rows)
            rows.append(np.empty((len(views),) + shape, STORED_DTYPE))
            labels.append(int(example[records.LABEL]))
            missing = []
            for v, name in enumerate(views):
                cached, _ = caches[name].get(sha) if caches.get(name) is not None else (None, False)
                if cached is None:
                    missing.append(v)
                else:
                    rows[row][v] = cached
                    bar.update()
            if missing:
                pending.append((row, sha, data, missing))
                if len(pending) * len(views) >= batch_size:  # front's batch: batch_size views, as before
                    flush()
        flush()
    acts = np.stack(rows) if rows else np.zeros((0, len(views)) + shape, STORED_DTYPE)
    return acts, np.asarray(labels, np.int64), computed


class ActivationBatches:
    """Keras batches of cached activations: each epoch every photo once, in one of its views picked at
    random, shuffled; with ``mixup`` > 0 each photo is mixed with another one (activations and one-hot
    labels, weight ~ Beta(mixup, mixup), the larger share to the photo itself), mixup in feature space.

    Every epoch's order, views and mixing come from (seed, epoch) alone, and fit reads them from one
    generator, epoch after epoch (``from_epoch``), so a resumed run sees the same epochs. (A Keras
    PyDataset would not do: its loader prefetches across its on_epoch_end, so which epoch's plan the
    last batches of an epoch come from depends on timing.)
    """

    def __init__(self, acts: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, seed: int,
                 mixup: float):
        self.acts, self.labels, self.batch_size, self.seed, self.mixup = acts, labels, batch_size, seed, mixup
        self.one_hot = np.eye(num_classes, dtype=np.float32)

    def __len__(self) -> int:
        """Batches per epoch (fit's steps_per_epoch)."""
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.labels)
        order, views = rng.permutation(n), rng.integers(0, self.acts.shape[1], n)
        partner, share = rng.permutation(n), np.ones(n, np.float32)
        if self.mixup:
            drawn = rng.beta(self.mixup, self.mixup, n).astype(np.float32)
            share = np.maximum(drawn, 1 - drawn)

        def example(rows):
            """(activations in this epoch's view, one-hot labels) of ``rows``."""
            return self.acts[rows, views[rows]].astype(np.float32), self.one_hot[self.labels[rows]]

        for index in range(len(self)):
            rows = order[index * self.batch_size:(index + 1) * self.batch_size]
            x, y = example(rows)
            if self.mixup:
                x_other, y_other = example(partner[rows])
                x_share = share[rows].reshape((-1,) + (1,) * (x.ndim - 1))
                x = x_share * x + (1 - x_share) * x_other
                y = share[rows][:, None] * y + (1 - share[rows][:, None]) * y_other
            yield x, y

    def from_epoch(self, first: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every epoch's batches from ``first`` on, without end: fit takes len(self) per epoch."""
        epoch = first
        while True:
            yield from self.epoch(epoch)
            epoch += 1


def batches(acts: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, seed: int,
            mixup: float) -> ActivationBatches:
    return ActivationBatches(acts, labels, num_classes, batch_size, seed, mixup)


def copy_weights(source, target) -> int:
    """Set every layer of ``target`` that has weights to the same-named layer's of ``source``; returns how many.

    A resumed fine-tune trains the top model it loaded from a checkpoint, not the one
    sharing layers with the exported classifier: this carries its weights over.
    """
    found = {layer.name: layer for layer in base_models.all_layers(source) if layer.weights}
    copied = 0
    for layer in base_models.all_layers(target):
        if layer.weights and layer.name in found and not hasattr(layer, "layers"):
            layer.set_weights(found[layer.name].get_weights())
            copied += 1
    return copied
