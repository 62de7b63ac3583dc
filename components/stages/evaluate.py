"""Stage 5, evaluate: the exported model on the test split only.

Outputs: ``metrics`` (accuracy, top-k accuracy, loss, macro F1, per-class
precision/recall/F1 and support), ``confusion`` (one row per test photo,
actual and predicted class names, for DVC's confusion template),
``confusion_png``, ``report`` (the most confident mistakes with their paths,
the engine that scored the model, wall time, devices), ``html``
(reports/evaluate.html, components/report.py: the page a person opens).
Scores and the confusion matrix are scikit-learn's.

The model scored is the exported model.keras, on ``evaluate.engine``: TensorFlow (the default), or its
float32 LiteRT conversion (components/engines.py: the whole classifier, test-time flip included, converted
in-process), whose probabilities differ from TensorFlow's in the last bits. LiteRT is faster a photo on a
CPU, but its conversion costs seconds and memory that pay only on a large test split (docs/results.md).

The gate: once its outputs are written, the stage fails (one line naming the
metric, its value and the threshold) when a metric is below
``evaluate.thresholds``; components/gate.py holds the rule, which
``graftline gate`` also applies against a baseline.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from components import devices, engines, gate, inference, plots, records, report
from components.atomic import read_json, write_csv, write_json
from components.errors import FailedWithOutputs, GraftlineError
from components.export import LABELS_FILE, MODEL_FILE
from components.datasets import image_dataset


def per_class_scores(actual: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict:
    """Precision, recall, F1 and support per class (scikit-learn's; 0 where a class is never predicted)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=list(range(len(labels))), zero_division=0)
    return {name: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                   "f1": round(float(f1[i]), 6), "support": int(support[i])} for i, name in enumerate(labels)}


def test_photos(examples: Path):
    """(key, stored image bytes) of the test split, for the report's thumbnails."""
    for example in records.dataset(examples, "test"):
        yield example[records.KEY].numpy().decode(), example[records.IMAGE].numpy()


def most_confident_mistakes(keys: list[str], actual: np.ndarray, probabilities: np.ndarray,
                            labels: list[str], n: int) -> list[dict]:
    """The n wrong predictions the model was surest of: often mislabelled photos, worth a look."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != actual)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:n]
    return [{"path": keys[i], "actual": labels[actual[i]], "predicted": labels[predicted[i]],
             "confidence": round(float(probabilities[i, predicted[i]]), 6)} for i in order]


def scorer(model, image_size: int, setting: str, model_dir: Path):
    """The function giving one photo's probabilities ([size, size, 3] in [0, 255]), one photo per forward pass
    (the figures do not depend on batching: components/inference.py), on the engine ``evaluate.engine`` picks;
    and what it ran: {"setting", "ran", "conversion_s"}."""
    ran = engines.resolve(setting)
    content, convert_s = (engines.litert_or_fallback(setting, "evaluate", f"the model in {model_dir}",
                                                     lambda: engines.to_litert(model))
                          if ran == "litert" else (None, None))
    if content is None:
        infer = inference.alone(model, image_size)
        return (lambda image: infer(image[None]).numpy()[0]), {"setting": setting, "ran": "tensorflow"}
    lite = engines.LiteRT(content)
    return (lambda image: lite(image[None])[0]), {"setting": setting, "ran": "litert", "conversion_s": convert_s}


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: examples, model, curves (fine-tune's PNG, optional). outputs: metrics (JSON), confusion (CSV),
    confusion_png, report (JSON), html (reports/evaluate.html)."""
    import keras

    started = time.time()
    model_dir = Path(inputs["model"])
    if not (model_dir / MODEL_FILE).exists():
        raise GraftlineError(f"{model_dir / MODEL_FILE} not found; run fine-tune first")
    labels = read_json(model_dir / LABELS_FILE)
    model = keras.saving.load_model(model_dir / MODEL_FILE)
    image_size = int(model.input_shape[1])
    score, engine = scorer(model, image_size, params.evaluate.engine, model_dir)
    probabilities, actual, keys = [], [], []
    for image, label, key in image_dataset(Path(inputs["examples"]), "test", image_size, 1, keys=True):
        probabilities.append(score(image.numpy()[0]))
        actual.append(int(label[0]))
        keys.append(key[0].numpy().decode())
    if not actual:
        raise GraftlineError(f"the test split in {inputs['examples']} is empty; raise data.test_percent")
    probabilities = np.stack(probabilities)
    actual = np.asarray(actual, np.int64)
    predicted = probabilities.argmax(axis=1)
    k = min(params.evaluate.top_k, len(labels))
    top_k = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    loss = float(keras.losses.sparse_categorical_crossentropy(actual, probabilities).numpy().mean())
    counts = confusion_matrix(actual, predicted, labels=list(range(len(labels))))
    per_class = per_class_scores(actual, predicted, labels)

    write_csv(Path(outputs["confusion"]), ("actual", "predicted"),
              [(labels[a], labels[p]) for a, p in zip(actual, predicted)])
    plots.confusion_png(counts, labels, Path(outputs["confusion_png"]))
    metrics = {
        "accuracy": round(float(np.mean(predicted == actual)), 6),
        f"top_{k}_accuracy": round(float(np.mean((top_k == actual[:, None]).any(axis=1))), 6),
        "loss": round(loss, 6),
        "macro_f1": round(float(np.mean([s["f1"] for s in per_class.values()])), 6),
        "num_test": int(len(actual)),
        "per_class": per_class,
    }
    write_json(Path(outputs["metrics"]), metrics)
    mistakes = most_confident_mistakes(keys, actual, probabilities, labels, params.evaluate.mistakes)
    wanted = {m["path"] for m in mistakes}
    photos = {key: image for key, image in test_photos(Path(inputs["examples"])) if key in wanted}
    curves = Path(inputs["curves"]).read_bytes() if Path(inputs["curves"]).is_file() else None
    report_page = report.render(metrics, labels, counts, mistakes, photos, Path(outputs["confusion_png"]).read_bytes(),
                                curves)
    report.write(Path(outputs["html"]), report_page)
    summary = {"mistakes": mistakes, "engine": engine, "wall_time_s": round(time.time() - started, 2),
               "devices": devices.visible()}
    write_json(Path(outputs["report"]), summary)
    # Checked after writing, so a failed gate still leaves the figures to look at (DVC records no run).
    failures = gate.threshold_failures(metrics, params.evaluate.thresholds)
    if failures:
        raise FailedWithOutputs("; ".join(failures))
    return {**metrics, **summary}
