"""bottleneck.engine (components/engines.py): the backbone converted to LiteRT computes TensorFlow's features,
on real flower photos with real ImageNet weights: the default's three EfficientNet-Lite bases at 260 px, and
MobileNetV2 at 160 px."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import FLOWERS, backbone_of


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    from conftest import keras_home_set, keras_home_with_weights, require_shared

    require_shared()
    with keras_home_set(keras_home_with_weights(tmp_path_factory.mktemp("keras"))) as home:
        yield home


def flower_pixels(size: int, per_class: int = 2) -> np.ndarray:
    """``per_class`` shared photos of every class, decoded as the bottleneck decodes them."""
    import tensorflow as tf

    from components import images

    files = [f for folder in sorted(p for p in FLOWERS.iterdir() if p.is_dir())
             for f in sorted(folder.glob("*.jpg"))[:per_class]]
    return np.stack([images.decode_and_resize(tf.io.read_file(str(f)), size).numpy() for f in files])


@pytest.mark.parametrize("base", [{}, {"model": "mobilenet_v2", "image_size": 160}],
                         ids=["default three bases", "mobilenet_v2"])
def test_litert_features_are_tensorflow_s_within_the_tolerance(keras_home, base):
    from components import engines

    backbone = backbone_of(training=False, **({"base": base} if base else {}))
    extractor = backbone.extractor()
    pixels = flower_pixels(backbone.image_size)
    reference = np.concatenate([extractor(pixels[i:i + 1], training=False).numpy() for i in range(len(pixels))])
    models = engines.backbone_to_litert(backbone, extractor)
    assert len(models) == len(backbone.bases)  # one per base: converting them together peaked over 2 GB
    run = engines.LiteRT(models, threads=2)
    litert = run(pixels)

    assert litert.shape == reference.shape == (len(pixels), int(extractor.output_shape[-1])) == (len(pixels), run.width)
    assert np.isfinite(litert).all()
    scale = np.abs(reference).max(axis=1)
    relative = np.abs(litert - reference).max(axis=1) / scale
    assert relative.max() <= engines.FEATURE_TOLERANCE, relative
    # Real features of different photos, not one vector: each photo is nearest to its own reference.
    distances = np.linalg.norm(litert[:, None, :] - reference[None, :, :], axis=2)
    assert (distances.argmin(axis=1) == np.arange(len(pixels))).all()
    # The weights are in the files (an unfrozen conversion holds none: a few hundred KB, NaN features).
    assert sum(map(len, models)) >= 4 * backbone_parameters(extractor) / 2


def backbone_parameters(extractor) -> int:
    return int(sum(np.prod(w.shape) for w in extractor.weights))


def test_a_single_thread_gives_the_same_features_as_two(keras_home):
    """Workers sharing the cores run LiteRT on fewer threads: the features must not depend on that."""
    from components import engines

    extractor = backbone_of(training=False, base={"model": "mobilenet_v2", "image_size": 160}).extractor()
    content = engines.to_litert(extractor)
    pixels = flower_pixels(160, per_class=1)
    one, two = engines.LiteRT(content, threads=1)(pixels), engines.LiteRT(content, threads=2)(pixels)
    np.testing.assert_allclose(one, two, rtol=0, atol=engines.FEATURE_TOLERANCE * np.abs(two).max())


def test_a_model_litert_cannot_take_falls_back_on_auto_and_fails_on_litert(capsys):
    """``auto`` runs TensorFlow with a line saying why; ``litert`` asked for is one line naming the stage's param."""
    from components import engines
    from components.errors import GraftlineError

    def cannot():
        raise ValueError("\nop FlexRandom is not supported\nmore detail")

    assert engines.litert_or_fallback("auto", "evaluate", "the model in m", cannot) == (None, None)
    assert capsys.readouterr().out == ("evaluate: LiteRT cannot convert the model in m (op FlexRandom is not "
                                       "supported); running it on TensorFlow\n")
    with pytest.raises(GraftlineError) as failed:
        engines.litert_or_fallback("litert", "bottleneck", "mobilenet_v2", cannot)
    assert str(failed.value) == ("bottleneck.engine: litert cannot convert mobilenet_v2 (op FlexRandom is not "
                                 "supported); set bottleneck.engine: tensorflow (or auto)")
    content, seconds = engines.litert_or_fallback("litert", "evaluate", "m", lambda: b"model")
    assert content == b"model" and seconds >= 0
