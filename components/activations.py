"""Fine-tuning from cached activations: the frozen part of each base runs once per photo and view.

Base layers below ``fine_tune_at`` never change in fine-tuning, and BatchNorm
runs in inference mode, so what they compute from a photo is fixed. Each base
of the backbone is cut where exactly one tensor flows from its frozen layers
into the rest (at or below its ``fine_tune_at`` index, and not much wider than
the narrowest such tensor there; MobileNetV2 at 100: before ``block_11_expand``,
index 98). ``front`` (image -> each base's tensor at its cut) runs once per
photo and view, its outputs are cached per photo and base
(components/vector_cache.py) as float16, and an epoch runs only ``top`` (those
tensors -> each base's pooled features, side by side: the layers from the cuts
up, sharing their weights with the bases) and the head. Frozen layers between a
cut and ``fine_tune_at`` stay frozen inside ``top``.

Views are what augmentation can still be when the frozen part is cached: the
photo as it is and mirrored (``images.view``), each a cached activation; an
epoch shows every photo once, in one of its views picked at random.

Activations travel as lists with one entry per base, in the backbone's order.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterator, NamedTuple

import numpy as np

from components import images

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
            producers = [position.get(id(tensor._keras_history.operation)) for tensor in node.input_tensors]
            if None in producers:  # a call in another graph (a model cut from this one earlier): not the base's
                continue
            for producer in producers:
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


class Cut(NamedTuple):
    """Where one base is cut: before layer ``index``, after the layer named ``layer``."""
    index: int
    layer: str


def split(backbone, extractor, fine_tune_at):
    """(front, top, cuts): image [0, 255] -> [each base's activation at its cut]; those activations -> the
    extractor's features; each base's Cut.

    ``top`` shares its layers with ``extractor``'s bases, so training it trains the model that is exported. The
    extractor's input block must have no noise (it would make the frozen part random): fine-tune takes the image
    path then.
    """
    import keras

    from components.backbone import joined

    image = keras.Input(extractor.input_shape[1:], name="image")
    at_cuts, inputs, outputs, cuts = [], [], [], []
    branches = backbone.branches(extractor)
    for i, ((in_front, net), at) in enumerate(zip(branches, backbone.fine_tune_indices(extractor, fine_tune_at))):
        cut = cut_index(net, at)
        tensor = net.layers[cut - 1].output
        x = image
        for layer in in_front:
            x = layer(x)
        at_cuts.append(keras.Model(net.inputs, tensor, name=f"frozen_front_{i}")(x))
        inputs.append(keras.Input(tensor.shape[1:], name=f"activation_{i}"))
        outputs.append(keras.Model(tensor, net.outputs[0], name=f"top_{i}")(inputs[-1]))
        cuts.append(Cut(cut, net.layers[cut - 1].name))
    return keras.Model(image, at_cuts, name="front"), keras.Model(inputs, joined(outputs), name="top"), cuts


def fingerprint(base_fingerprint: str, cut_layer: str, view: str) -> str:
    """The cache folder of one cut and view, under the base's feature fingerprint."""
    spec = {"base": base_fingerprint, "cut": cut_layer, "view": view, "view_version": images.VIEW_VERSION,
            "dtype": np.dtype(STORED_DTYPE).name}
    base_name = base_fingerprint.rsplit("-", 1)[0]  # base_models.cache_fingerprint: "<base>-<hash>"
    return f"activations-{base_name}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def views_for(augment) -> tuple[str, ...]:
    """The views fine-tuning caches per training photo: the photo, and its mirror when augment.flip is on."""
    return images.VIEWS if augment.flip else images.VIEWS[:1]


def shapes(front) -> list[tuple[int, ...]]:
    """The shape of one photo's activation at each base's cut."""
    return [tuple(int(d) for d in tensor.shape[1:]) for tensor in front.outputs]


def compute(front, examples_dir, split: str, views, image_size: int, caches: list[dict], batch_size: int):
    """([per base: activations [n, views, *shape] float16], labels [n] int64, views computed) of one split,
    cached per photo, base and view.

    ``caches``: per base, view -> VectorCache (an empty dict keeps nothing on disk). A photo's view is read when
    every base has it cached; otherwise the photo is decoded once and its views go through ``front`` together,
    in batches of ``batch_size`` views (so recomputed values depend on the batch in their last bits; see
    features.RECOMPUTED_ATOL).
    """
    import tensorflow as tf
    from tqdm import tqdm

    from components import records

    per_base = shapes(front)

    # Each photo is decoded once, and its views go through ``front`` as one batch (view by view).
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def run(image_bytes):
        decoded = images.decode_batch(image_bytes, image_size)
        return tf.nest.flatten(front(tf.concat([images.view(decoded, name) for name in views], axis=0), training=False))

    n = records.count(examples_dir, split)
    # Filled in place, photo by photo: the split's activations are held once, never as a list and a copy.
    acts = [np.empty((n, len(views)) + shape, STORED_DTYPE) for shape in per_base]
    labels, pending = np.empty(n, np.int64), []
    computed = 0

    def cached(sha: str, name: str) -> list | None:
        found = [c[name].get(sha)[0] if c.get(name) is not None else None for c in caches] if caches else [None]
        return None if any(a is None for a in found) else found

    def flush():
        nonlocal computed
        if not pending:
            return
        outs = run(tf.constant([data for _, _, data, _ in pending]))
        for b, (out, shape) in enumerate(zip(outs, per_base)):
            out = out.numpy().astype(STORED_DTYPE).reshape((len(views), len(pending)) + shape)
            for i, (row, sha, _, missing) in enumerate(pending):
                for v in missing:  # a view already cached keeps its cached value
                    acts[b][row, v] = out[v, i]
                    if caches and caches[b].get(views[v]) is not None:
                        caches[b][views[v]].put(sha, out[v, i])
        for _, _, _, missing in pending:
            computed += len(missing)
            bar.update(len(missing))
        pending.clear()

    with tqdm(desc=f"fine-tune: {split} activations ({' + '.join(views)})", unit="view", total=n * len(views)) as bar:
        for row, example in enumerate(records.dataset(examples_dir, split)):
            data = example[records.IMAGE].numpy()
            sha = hashlib.sha256(data).hexdigest()
            labels[row] = int(example[records.LABEL])
            missing = []
            for v, name in enumerate(views):
                found = cached(sha, name)
                if found is None:
                    missing.append(v)
                else:
                    for b, activation in enumerate(found):
                        acts[b][row, v] = activation
                    bar.update()
            if missing:
                pending.append((row, sha, data, missing))
                if len(pending) * len(views) >= batch_size:  # front's batch: batch_size views, as before
                    flush()
        flush()
    return acts, labels, computed


class ActivationBatches:
    """Keras batches of cached activations (one array per base, [photos, views, *shape]): each epoch every photo
    once, in one of its views picked at random, shuffled; with ``mixup`` > 0 each photo is mixed with another one
    (every base's activations and the one-hot labels, weight ~ Beta(mixup, mixup), the larger share to the photo
    itself), mixup in feature space.

    Every epoch's order, views and mixing come from (seed, epoch) alone, and fit reads them from one
    generator, epoch after epoch (``from_epoch``), so a resumed run sees the same epochs. (A Keras
    PyDataset would not do: its loader prefetches across its on_epoch_end, so which epoch's plan the
    last batches of an epoch come from depends on timing.)
    """

    def __init__(self, acts: list[np.ndarray], labels: np.ndarray, num_classes: int, batch_size: int, seed: int,
                 mixup: float):
        self.acts, self.labels, self.batch_size, self.seed, self.mixup = acts, labels, batch_size, seed, mixup
        self.one_hot = np.eye(num_classes, dtype=np.float32)

    def __len__(self) -> int:
        """Batches per epoch (fit's steps_per_epoch)."""
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[tuple[np.ndarray, ...], np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.labels)
        order, views = rng.permutation(n), rng.integers(0, self.acts[0].shape[1], n)
        partner, share = rng.permutation(n), np.ones(n, np.float32)
        if self.mixup:
            drawn = rng.beta(self.mixup, self.mixup, n).astype(np.float32)
            share = np.maximum(drawn, 1 - drawn)

        def example(rows):
            """(each base's activations in this epoch's view, one-hot labels) of ``rows``."""
            return [acts[rows, views[rows]].astype(np.float32) for acts in self.acts], self.one_hot[self.labels[rows]]

        for index in range(len(self)):
            rows = order[index * self.batch_size:(index + 1) * self.batch_size]
            xs, y = example(rows)
            if self.mixup:
                xs_other, y_other = example(partner[rows])
                mine = share[rows]
                xs = [weighted(mine, x, x_other) for x, x_other in zip(xs, xs_other)]
                y = weighted(mine, y, y_other)
            yield tuple(xs), y

    def from_epoch(self, first: int) -> Iterator[tuple[tuple[np.ndarray, ...], np.ndarray]]:
        """Every epoch's batches from ``first`` on, without end: fit takes len(self) per epoch."""
        epoch = first
        while True:
            yield from self.epoch(epoch)
            epoch += 1


def weighted(share: np.ndarray, mine: np.ndarray, other: np.ndarray) -> np.ndarray:
    """share x mine + (1 - share) x other, one share per row."""
    share = share.reshape((-1,) + (1,) * (mine.ndim - 1))
    return share * mine + (1 - share) * other


def batches(acts: list[np.ndarray], labels: np.ndarray, num_classes: int, batch_size: int, seed: int,
            mixup: float) -> ActivationBatches:
    return ActivationBatches(acts, labels, num_classes, batch_size, seed, mixup)
