"""Fine-tuning from cached activations (components/activations.py) and test-time flip averaging.

On a small MobileNetV2 (alpha 0.35 at 96 px, the shared ImageNet weights: a
random one outputs features near 0) and drawn photos: where the base is cut, that front + top is the base, that a loss from
cached activations is the loss from the images, the per-photo cache, the
epochs' views and mixup, and the TTA model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components import activations, datasets, images, records
from components.backbone import Backbone, networks
from components.stages import ingest
from conftest import SHARED, require_shared
from drawing import make_class_tree
from pipeline import params as params_mod
from pipeline import runtime

SIZE = 96
WEIGHTS_035 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(params, weights file, examples folder) for 3 classes of drawn photos."""
    require_shared()
    runtime.configure(0)
    work = tmp_path_factory.mktemp("activations")
    weights = WEIGHTS_035
    tree = make_class_tree(work / "photos", {"cats": 8, "dogs": 8, "owls": 8}, size=(80, 64))
    p = params_mod.from_dict({
        "data": {"source": str(tree), "sha256": "", "val_percent": 25, "test_percent": 25},
        "base": {"model": "mobilenet_v2", "alpha": 0.35, "image_size": SIZE, "weights": str(weights)},
        "bottleneck": {"cache_dir": str(work / "cache")},
    })
    ingest.run(p, {"downloads": work / "download", "extract_dir": work / "raw"},
               {"examples": work / "examples", "labels": work / "labels.json", "report": work / "ingest.json"})
    return p, str(weights), work / "examples"


def extractor(p, weights):
    return Backbone.from_params(p).extractor()


def split(p, fine_tune_at, model=None):
    """activations.split of ``model`` (default: a fresh extractor) at ``fine_tune_at``: (front, top, cuts)."""
    return activations.split(Backbone.from_params(p), model or extractor(p, None), fine_tune_at)


@pytest.mark.parametrize("fine_tune_at, cut", [(100, 98), (98, 98), (125, 125), (134, 134), (1, 1), (60, 60)])
def test_the_cut_is_the_last_single_tensor_at_or_below_fine_tune_at(setup, fine_tune_at, cut):
    p, weights, _ = setup
    [base] = networks(extractor(p, weights))
    assert activations.cut_index(base, fine_tune_at) == cut
    # block_11 (98..106) adds its input back: inside it two tensors cross, so 99..106 are never cuts.
    for inside in range(99, 107):
        assert activations.cut_index(base, inside) == 98


@pytest.mark.parametrize("fine_tune_at, cut_layer", [(56, "block_5_add"), (57, "block_5_add"),
                                                     (30, "block_2_add")])
def test_the_cut_skips_back_past_an_expanded_tensor_to_the_narrow_one_below(setup, fine_tune_at, cut_layer):
    # At 56 and 57 the last single tensor is block_6's 1x1 expansion (6x block_5_add's channels):
    # caching it would take 6x the memory and disk of block_5_add, two layers below.
    p, weights, _ = setup
    [base] = networks(extractor(p, weights))
    cut = activations.cut_index(base, fine_tune_at)
    assert base.layers[cut - 1].name == cut_layer
    narrowest = min(int(np.prod(layer.output.shape[1:])) for layer in base.layers[:fine_tune_at])
    assert int(np.prod(base.layers[cut - 1].output.shape[1:])) <= activations.MAX_CUT_WIDTH * narrowest


def test_front_then_top_is_the_extractor(setup):
    p, weights, examples = setup
    model = extractor(p, weights)
    front, top, [cut] = split(p, 100, model)
    assert cut == (98, "block_10_project_BN") and activations.shapes(front) == [(6, 6, 32)]
    batch = next(iter(records.dataset(examples, "train").batch(6)))[records.IMAGE]
    pixels = images.decode_batch(batch, SIZE)
    np.testing.assert_allclose(top(front(pixels)).numpy(), model(pixels).numpy(), atol=1e-5)
    # top shares the base's layers: what fine-tuning changes is what gets exported
    [base], [top_of_base] = networks(model), networks(top)
    assert all(layer is base.get_layer(layer.name) for layer in top_of_base.layers[1:])


def test_the_first_batch_loss_from_cached_activations_is_the_loss_from_the_images(setup):
    """Fine-tuning from activations (stored as float16) and from images, augmentation off: one loss."""
    import keras

    from components.stages import fine_tune

    p, weights, examples = setup
    runtime.configure(p.seed)
    head = keras.Sequential([keras.Input((1280,)), keras.layers.Dense(3, activation="softmax", name="head_dense")],
                            name="head")
    classifier, _ = fine_tune.build_classifier(p, Backbone.from_params(p), head)
    front, top, _ = split(p, 100, classifier.get_layer("feature_extractor"))
    [acts], labels, computed = activations.compute(front, examples, "train", ("identity",), SIZE, [], 8)
    assert computed == len(labels) == acts.shape[0] > 0
    pixels = np.concatenate([x.numpy() for x, _ in datasets.image_dataset(examples, "train", SIZE, 64)])
    loss = keras.losses.SparseCategoricalCrossentropy()
    from_images = float(loss(labels, classifier(pixels, training=False)))
    from_cached = float(loss(labels, head(top(acts[:, 0].astype(np.float32), training=False))))
    assert from_images == pytest.approx(from_cached, abs=ACTIVATION_LOSS_ATOL)
    assert from_images != pytest.approx(float(loss(labels[::-1], classifier(pixels))), abs=0.01)


# float16 storage of the activations: the loss over a batch moves by less than this (measured 7e-5).
ACTIVATION_LOSS_ATOL = 1e-3
# float16 storage and the batch's composition: an activation moves by less than this absolutely (plus 1% of it).
ACTIVATION_ATOL = 1e-2


def test_activations_are_cached_per_photo_and_view(setup, tmp_path):
    from components.vector_cache import VectorCache

    p, weights, examples = setup
    front, _, _ = split(p, 100)
    [shape] = activations.shapes(front)
    caches = [{v: VectorCache(str(tmp_path), f"acts-{v}", shape, activations.STORED_DTYPE, "f16")
               for v in images.VIEWS}]
    [first], labels, computed = activations.compute(front, examples, "train", images.VIEWS, SIZE, caches, 5)
    assert computed == 2 * len(labels) and first.dtype == np.float16 and first.shape[1] == 2
    assert not np.array_equal(first[:, 0], first[:, 1])  # the mirror is another view
    # each photo's row holds its own views, in order: the photo, then its mirror (batches decode once for both)
    pixels = np.concatenate([x.numpy() for x, _ in datasets.image_dataset(examples, "train", SIZE, 64)])
    for v, name in enumerate(images.VIEWS):
        want = front(images.view(pixels, name), training=False).numpy()
        np.testing.assert_allclose(first[:, v].astype(np.float32), want, atol=ACTIVATION_ATOL, rtol=1e-2)
    [again], labels_again, computed_again = activations.compute(front, examples, "train", images.VIEWS, SIZE, caches,
                                                                5)
    assert computed_again == 0 and np.array_equal(again, first) and np.array_equal(labels_again, labels)
    torn = sorted((tmp_path / "acts-flip").rglob("*.f16"))[0]
    torn.write_bytes(torn.read_bytes()[:100])
    _, _, recomputed = activations.compute(front, examples, "train", images.VIEWS, SIZE, caches, 5)
    assert recomputed == 1


def test_each_epoch_shows_every_photo_once_in_a_seeded_view():
    acts = np.arange(10 * 2 * 3, dtype=np.float16).reshape(10, 2, 3)  # photo i, view v -> distinct values
    labels = np.arange(10) % 3
    plain = activations.batches([acts], labels, 3, 4, seed=7, mixup=0.0)
    assert len(plain) == 3
    first = [(x, y) for (x,), y in plain.epoch(0)]
    assert len(first) == 3
    seen = np.concatenate([x for x, _ in first])
    photos = (seen[:, 0] // 6).astype(int)
    assert sorted(photos) == list(range(10))  # every photo once
    views = ((seen[:, 0] % 6) // 3).astype(int)
    assert 0 < views.sum() < 10  # some photos mirrored, some not
    labels_seen = np.concatenate([y for _, y in first])
    np.testing.assert_array_equal(labels_seen.argmax(1), labels[photos])
    again = activations.batches([acts], labels, 3, 4, seed=7, mixup=0.0)
    np.testing.assert_array_equal(next(again.epoch(0))[0][0], first[0][0])  # same seed, same epoch: same batches
    second = list(plain.epoch(1))
    assert not np.array_equal(second[0][0][0], first[0][0])  # the next epoch is another draw
    # fit reads one stream: epoch after epoch; a run resumed after epoch 1 reads the same epoch 2 on
    stream = plain.from_epoch(0)
    through = [next(stream) for _ in range(6)]
    resumed = again.from_epoch(1)
    for (x, y), (x_resumed, y_resumed) in zip(through[3:], [next(resumed) for _ in range(3)]):
        np.testing.assert_array_equal(x[0], x_resumed[0])
        np.testing.assert_array_equal(y, y_resumed)


def test_mixup_mixes_every_base_s_activations_and_the_labels_alike_with_the_larger_share_to_the_photo():
    acts = np.eye(6, dtype=np.float16).reshape(6, 1, 6)  # photo i = unit vector i
    other_base = 10 * np.eye(6, dtype=np.float16)[:, None, ::-1]  # another base: photo i = 10 x unit vector 5 - i
    labels = np.array([0, 1, 2, 0, 1, 2])
    (x, x_other), y = next(activations.batches([acts, other_base], labels, 3, 6, seed=3, mixup=0.4).epoch(0))
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(x.sum(1), 1.0, atol=1e-3)  # a convex mix of two photos
    top = x.max(1)
    assert (top >= 0.5 - 1e-3).all() and (top < 1).any()
    # the second base's activations are mixed from the same photos with the same shares
    np.testing.assert_allclose(x_other[:, ::-1] / 10, x, atol=1e-3)


def test_flip_averaging_is_the_mean_over_the_photo_and_its_mirror(setup):
    import keras

    p, weights, examples = setup
    model = keras.Sequential([extractor(p, weights), keras.layers.Dense(3, activation="softmax")])
    tta = images.with_flip_averaged(model)
    batch = next(iter(records.dataset(examples, "test").batch(4)))[records.IMAGE]
    pixels = images.decode_batch(batch, SIZE).numpy()
    expected = (model(pixels).numpy() + model(pixels[:, :, ::-1]).numpy()) / 2
    np.testing.assert_allclose(tta(pixels).numpy(), expected, atol=1e-6)
    assert not np.allclose(model(pixels).numpy(), expected, atol=1e-4)  # the mirror changes the answer
    path = Path(str(examples)).parent / "tta.keras"
    tta.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(pixels).numpy(), tta(pixels).numpy(), atol=1e-6)
