"""AlexNet in Keras, architecture only: there are no pretrained weights for it here (``base.weights: none``).

The classic network (Krizhevsky, Sutskever and Hinton 2012, on one device: no
two-GPU grouping of conv2, conv4 and conv5) at its 227 px input, with the
layer names of the original (Caffe's ``bvlc_alexnet``), so ``fine_tune_at``
can name them:

    layer        output at 227 px   what it is
    conv1        55 x 55 x  96      11x11, stride 4, valid
    pool1        27 x 27 x  96      max 3x3, stride 2
    conv2        27 x 27 x 256      5x5, same (the original's pad 2)
    pool2        13 x 13 x 256      max 3x3, stride 2
    conv3        13 x 13 x 384      3x3, same
    conv4        13 x 13 x 384      3x3, same
    conv5        13 x 13 x 256      3x3, same
    pool5         6 x  6 x 256      max 3x3, stride 2
    avg_pool    256                 global average pooling: the feature vector

Each convolution is followed by ``convN_bn`` (BatchNormalization) and
``convN_relu``. The original's local response normalisation (after conv1 and
conv2) is replaced by batch norm after every convolution: trained from random
weights, batch norm converges in far fewer epochs and at larger learning
rates, which is what the recipe needs (presets/flowers_alexnet.yaml,
docs/alexnet.md). The convolutions keep their biases and start from He-normal
kernels (suited to ReLU), so the network still trains where batch norm is held
fixed (fine-tune freezes batch norm layers, as for a pretrained base).

The base ends at pool5 + global average pooling (256 features), like every
graftline base: the classic fc6 and fc7 (4096 each, 54.5M of the original's
61M weights, on the flattened 6 x 6 x 256) are a classifier top, and the top is
the head's business (components/head.py; ``train_head.hidden_units`` adds a
hidden layer). Inputs are scaled to [-1, 1] by the ``tf`` preprocessing mode
(components/images.py), inside the model as for every base.
"""
from __future__ import annotations

NAME = "alexnet"
IMAGE_SIZE = 227
FEATURE_WIDTH = 256
POOL_LAYER = "avg_pool"  # the base ends here
PREPROCESSING = "tf"  # components.images.ImagePreprocessing: [0, 255] -> [-1, 1]
BN_EPSILON = 1e-3  # Keras' default
# PyTorch's default (its 0.1): the moving statistics follow the training batches within tens of steps, where
# Keras' 0.99 would take hundreds; from random weights they change fast, and a small folder has few steps.
BN_MOMENTUM = 0.9

# (name, filters, kernel, stride, padding, the max pooling after it or ''), in order.
CONVOLUTIONS = (
    ("conv1", 96, 11, 4, "valid", "pool1"),
    ("conv2", 256, 5, 1, "same", "pool2"),
    ("conv3", 384, 3, 1, "same", ""),
    ("conv4", 384, 3, 1, "same", ""),
    ("conv5", 256, 3, 1, "same", "pool5"),
)
POOL_SIZE, POOL_STRIDE = 3, 2  # overlapping max pooling, as the original's


def min_image_size() -> int:
    """The smallest input that leaves pool5 at least 1 x 1 (67 px)."""
    size = 1
    for _, _, kernel, stride, padding, pool in reversed(CONVOLUTIONS):
        if pool:
            size = (size - 1) * POOL_STRIDE + POOL_SIZE
        if padding == "valid":
            size = (size - 1) * stride + kernel
    return size


def build(name: str = NAME, image_size: int = IMAGE_SIZE):
    """The base: [-1, 1]-scaled RGB (image_size, image_size, 3) -> 256 pooled features, random weights."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3), name="input")
    x = inputs
    for conv, filters, kernel, stride, padding, pool in CONVOLUTIONS:
        x = layers.Conv2D(filters, kernel, stride, padding=padding, kernel_initializer="he_normal", name=conv)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{conv}_bn")(x)
        x = layers.ReLU(name=f"{conv}_relu")(x)
        if pool:
            x = layers.MaxPooling2D(POOL_SIZE, POOL_STRIDE, name=pool)(x)
    x = layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    return keras.Model(inputs, x, name=name)
