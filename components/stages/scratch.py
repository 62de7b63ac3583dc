"""The control experiment: the same network from random weights, same photos, same epoch budget.

Transfer learning should beat training from scratch; this measures by how
much. The backbone's architecture (every base, with its preprocessing and input
block) is re-initialised (``keras.models.clone_model`` draws fresh weights), topped with the same head, and trained on the train
split for as many epochs as the head and fine-tuning took together, with
Adam at 1e-3 (what trains a network from scratch here, as in
components/stages/pretrain.py; the head's rate may be far too high for a whole
network) and the same augmentation. Scored on the
test split beside the transferred model's accuracy from metrics/evaluate.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from components import base_models, inference
from components.atomic import read_json, write_json
from components.backbone import Backbone
from components.datasets import augmenter, image_dataset
from components.head import build_head
from components.recipe import keras_verbosity, make_optimizer

SCRATCH_LEARNING_RATE = 1e-3


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: examples, labels, head_metrics, fine_tune_metrics, transfer_metrics. outputs: metrics (JSON)."""
    import keras

    started = time.time()
    b, h = params.base, params.train_head
    labels = read_json(Path(inputs["labels"]))
    budget = sum(read_json(Path(inputs[k]))["epochs_run"] for k in ("head_metrics", "fine_tune_metrics"))
    extractor = keras.models.clone_model(Backbone.from_params(params).extractor())  # fresh random weights
    for layer in base_models.all_layers(extractor):  # from scratch, BatchNorm too must learn its statistics
        layer.trainable = True
    head = build_head(int(extractor.output_shape[-1]), len(labels), h.dropout)
    image = keras.Input((b.image_size, b.image_size, 3), name="image")
    model = keras.Model(image, head(extractor(image)), name="scratch")
    model.compile(make_optimizer("adam", SCRATCH_LEARNING_RATE), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    examples = Path(inputs["examples"])
    train = image_dataset(examples, "train", b.image_size, params.fine_tune.batch_size,
                          shuffle_seed=params.seed, augment=augmenter(params))
    val = image_dataset(examples, "val", b.image_size, params.fine_tune.batch_size)
    history = model.fit(train, validation_data=val, epochs=budget, shuffle=False, verbose=keras_verbosity()).history
    infer = inference.alone(model, b.image_size)  # one photo per pass, as evaluate scores the transfer
    hits = [int(infer(image).numpy()[0].argmax()) == int(label[0])
            for image, label in image_dataset(examples, "test", b.image_size, 1)]
    scratch_accuracy = float(np.mean(hits))
    transfer_accuracy = read_json(Path(inputs["transfer_metrics"]))["accuracy"]
    metrics = {
        "scratch_accuracy": round(scratch_accuracy, 6),
        "transfer_accuracy": transfer_accuracy,
        "epochs": budget,
        "scratch_val_accuracy": round(float(history["val_accuracy"][-1]), 6),
    }
    write_json(Path(outputs["metrics"]), metrics)  # no timing: same params, same metrics file
    return {**metrics, "wall_time_s": round(time.time() - started, 2)}
