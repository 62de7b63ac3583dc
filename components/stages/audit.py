"""Stage: audit — what is wrong with the photos, found from the cached features and a hash of each stored photo.

cleanlab's Datalab runs on the bottleneck features of every photo in every split, with out-of-sample
predicted probabilities from K-fold cross-validation (``audit.folds``) of a logistic regression on those
features. It finds:

- label issues: photos whose class the other photos' features say is another one (often a photo filed
  under the wrong class; sometimes a photo of two classes at once);
- near-duplicates: the same photo resized, re-encoded or recoloured (identical bytes are ingest's
  duplicates), found by perceptual hash (imagehash's phash of every stored photo) and by Datalab on the
  features. Datalab alone misses most copies: the features of a photo resized to 70% moved as far as half
  the typical distance between two different photos (docs/results.md). A pair that straddles splits is
  leakage: the test split then scores a photo the model trained on;
- outliers: photos unlike any other (not a flower at all, a drawing, a collage).

Outputs: ``report`` (reports/audit.json, each list most suspect first, paths as ingest names them) and
``html`` (reports/audit.html: thumbnails read from the examples). Acting on it: add a photo's path to the
file ``data.exclude`` names and run again.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from components import audit_page, features, records
from components.atomic import read_json, write_json
from components.errors import GraftlineError


def issue_types(label_filter: str) -> dict:
    """Datalab's issue types. n_jobs 1: cleanlab's label search forks a process pool otherwise, and a fork of a
    process that runs TensorFlow's threads (TFX's LocalDagRunner runs every component in one) can hang for good.
    filter_by (audit.label_filter): cleanlab's own default, prune_by_noise_rate, flags only the photos it is sure
    of (about 25 of the 400 with 20 flips), so the first 40 held 15.9 flips on average; predicted_neq_given
    (the cross-validated model puts the photo in another class) 18.4 (docs/results.md)."""
    label = {"find_label_issues_kwargs": {"n_jobs": 1, "filter_by": label_filter}}
    return {"label": {"clean_learning_kwargs": label}, "near_duplicate": {}, "outlier": {}}


def all_photos(bottlenecks: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(keys, labels, features, splits) of every photo in every split, in split then key order."""
    keys, labels, feats, splits = [], [], [], []
    for split in records.SPLITS:
        split_keys, split_labels, split_feats = features.read_split(bottlenecks, split)
        keys += split_keys
        labels.append(split_labels)
        feats.append(split_feats)
        splits += [split] * len(split_keys)
    return keys, np.concatenate(labels), np.concatenate(feats), splits


def photo_hashes(examples: Path, keys: list[str]) -> np.ndarray:
    """Each photo's 64-bit perceptual hash (imagehash's phash of the photo as ingest stored it), as 64 booleans,
    in the order of ``keys``."""
    import imagehash
    from PIL import Image

    bits = {}
    for record in records.read_all(examples):
        with Image.open(io.BytesIO(record.image)) as image:
            image.draft("L", (128, 128))  # JPEG decodes at a fraction of its size: phash reads 32 x 32
            bits[record.key] = imagehash.phash(image).hash.ravel()
    missing = [key for key in keys if key not in bits]
    if missing:
        raise GraftlineError(f"audit: {missing[0]} has features but no example ({len(missing)} in all): the "
                             "bottleneck is older than ingest; run `dvc repro` (or `graftline bottleneck`) first")
    return np.array([bits[key] for key in keys])


def hash_pairs(bits: np.ndarray, most: int) -> set[tuple[int, int]]:
    """Every pair i < j of photos whose hashes differ in at most ``most`` bits."""
    from sklearn.metrics import pairwise_distances_chunked

    def close(chunk, start):  # per photo start + row, the later photos close to it (distances: fractions of bits)
        near = np.rint(chunk * bits.shape[1]) <= most
        return [[j for j in np.flatnonzero(near[row]) if j > start + row] for row in range(len(chunk))]

    chunks = pairwise_distances_chunked(bits, metric="hamming", reduce_func=close, working_memory=128)  # MiB
    rows = (row for chunk in chunks for row in chunk)
    return {(i, int(j)) for i, row in enumerate(rows) for j in row}


def out_of_sample_probabilities(x: np.ndarray, y: np.ndarray, folds: int, seed: int, class_names: list[str]):
    """Each photo's class probabilities from a logistic regression that never saw it (stratified K folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < folds:
        name = class_names[int(counts.argmin())]
        raise GraftlineError(f"params: audit.folds = {folds} needs at least {folds} photos in every class; class "
                             f"'{name}' has {counts.min()}: lower audit.folds (>= 2) or add photos")
    # C = 0.01: the best cross-validated accuracy of 0.01, 0.1 and 1 on the 400-photo sample (MobileNetV2 features)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=1000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")


def run(params, inputs: dict, outputs: dict) -> dict:
    """inputs: bottlenecks, labels, examples (thumbnails). outputs: report (JSON), html (the page)."""
    from cleanlab import Datalab
    from sklearn.metrics import pairwise_distances

    started = time.time()
    class_names = read_json(Path(inputs["labels"]))
    keys, y, x, splits = all_photos(Path(inputs["bottlenecks"]))
    probabilities = out_of_sample_probabilities(x, y, params.audit.folds, params.seed, class_names)
    lab = Datalab(data={"label": y}, label_name="label", verbosity=0)
    lab.find_issues(features=x, pred_probs=probabilities, issue_types=issue_types(params.audit.label_filter))

    found = lab.get_issues("label")
    flagged = np.flatnonzero(found["is_label_issue"].to_numpy())
    scores = found["label_score"].to_numpy()
    suggested = found["predicted_label"].to_numpy()
    label_issues = [{"path": keys[i], "split": splits[i], "given": class_names[y[i]],
                     "suggested": class_names[suggested[i]], "score": round(float(scores[i]), 6)}
                    for i in flagged[np.argsort(scores[flagged], kind="stable")]]

    info = lab.get_info("near_duplicate")
    near = lab.get_issues("near_duplicate")
    by_features = {(min(i, j), max(i, j)) for i in np.flatnonzero(near["is_near_duplicate_issue"].to_numpy())
                   for j in info["near_duplicate_sets"][i]}
    bits = photo_hashes(Path(inputs["examples"]), keys)
    by_hash = hash_pairs(bits, params.audit.hash_bits)
    near_duplicates = []
    for i, j in by_features | by_hash:
        found_by = [name for name, found in (("photo hash", by_hash), ("features", by_features)) if (i, j) in found]
        near_duplicates.append({
            "paths": [keys[i], keys[j]], "splits": [splits[i], splits[j]],
            "distance": round(float(pairwise_distances(x[[i]], x[[j]], metric=info["metric"])[0, 0]), 6),
            "hash_bits": int(np.count_nonzero(bits[i] != bits[j])), "found_by": found_by})
    near_duplicates.sort(key=lambda pair: (pair["hash_bits"], pair["distance"], pair["paths"]))

    outlying = lab.get_issues("outlier")
    flagged = np.flatnonzero(outlying["is_outlier_issue"].to_numpy())
    scores = outlying["outlier_score"].to_numpy()
    outliers = [{"path": keys[i], "split": splits[i], "score": round(float(scores[i]), 6)}
                for i in flagged[np.argsort(scores[flagged], kind="stable")]]

    leakage = [pair for pair in near_duplicates if pair["splits"][0] != pair["splits"][1]]
    summary = {"photos": len(keys), "folds": params.audit.folds, "label_filter": params.audit.label_filter,
               "cross_validated_accuracy": round(float(np.mean(probabilities.argmax(axis=1) == y)), 6),
               "label_issues": len(label_issues), "near_duplicate_pairs": len(near_duplicates),
               "leakage_pairs": len(leakage), "outliers": len(outliers),
               "near_duplicate_metric": info["metric"], "hash_bits": params.audit.hash_bits,
               "wall_time_s": round(time.time() - started, 2)}
    report = {"label_issues": label_issues, "near_duplicates": near_duplicates, "outliers": outliers,
              "summary": summary}
    audit_page.write(Path(outputs["html"]), report, Path(inputs["examples"]), params.audit.listed, params.data.exclude)
    summary["wall_time_s"] = round(time.time() - started, 2)
    write_json(Path(outputs["report"]), report)
    return {**summary, "page": str(outputs["html"])}
