"""reports/evaluate.html: one self-contained page a person opens after a run (no network needed).

The headline metrics, the per-class table, the confusion matrix (a table and the
PNG), the head + fine-tune learning curves with the "start fine-tuning" marker,
and the most confident mistakes as thumbnails with their path, actual and
predicted class and probability: the fastest way to find mislabelled photos.
Every image is inlined as a data: URL, so the file can be mailed, attached to a
CI run or opened from a DVC cache as it is.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from components.atomic import atomic_file

THUMBNAIL_PX = 160

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.headline span { display: inline-block; margin-right: 2em; font-size: 1.1em; }
.headline b { font-size: 1.4em; }
.mistakes { display: flex; flex-wrap: wrap; gap: 14px; }
.mistake { width: 180px; font-size: 0.8em; word-break: break-all; }
.mistake img { max-width: 160px; max-height: 160px; display: block; }
.diag { background: #e6f0fa; font-weight: bold; }
"""


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def thumbnail(image_bytes: bytes) -> bytes:
    """A JPEG of at most THUMBNAIL_PX on its longer side, upright and RGB, as ingest stored the photo."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image_bytes)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()


def render(metrics: dict, labels: list[str], counts, mistakes: list[dict], images: dict[str, bytes],
           confusion_png: bytes, curves_png: bytes | None) -> str:
    """The page; ``images``: path -> encoded photo bytes of each mistake."""
    e = html.escape
    k = next((key for key in metrics if key.startswith("top_") and key.endswith("_accuracy")), None)
    headline = [("test accuracy", metrics["accuracy"]), ("macro F1", metrics["macro_f1"]),
                ("loss", metrics["loss"])] + ([(k.replace("_", " "), metrics[k])] if k else [])
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>graftline: evaluation</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Evaluation on the test split ({metrics['num_test']} photos)</h1>",
             "<p class='headline'>" + "".join(f"<span>{e(name)}: <b>{value:.3f}</b></span>"
                                             for name, value in headline) + "</p>",
             "<h2>Per class</h2><table id='per-class'><tr><th>class</th><th>precision</th><th>recall</th>"
             "<th>F1</th><th>photos</th></tr>"]
    for name, s in metrics["per_class"].items():
        parts.append(f"<tr><td>{e(name)}</td><td>{s['precision']:.3f}</td><td>{s['recall']:.3f}</td>"
                     f"<td>{s['f1']:.3f}</td><td>{s['support']}</td></tr>")
    parts.append("</table><h2>Confusion matrix</h2><table id='confusion'><tr><th>actual \\ predicted</th>"
                 + "".join(f"<th>{e(name)}</th>" for name in labels) + "</tr>")
    for i, name in enumerate(labels):
        cells = "".join(f"<td class='{'diag' if i == j else ''}'>{int(counts[i][j])}</td>" for j in range(len(labels)))
        parts.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
    parts.append(f"</table><p><img id='confusion-png' alt='confusion matrix' src='{data_url(confusion_png)}'></p>")
    parts.append("<h2>Learning curves (head, then fine-tuning)</h2>")
    parts.append(f"<p><img id='curves' alt='learning curves' src='{data_url(curves_png)}'></p>" if curves_png
                 else "<p>No learning curves were found (plots/learning_curves.png).</p>")
    parts.append(f"<h2>The {len(mistakes)} most confident mistakes</h2>"
                 "<p>Often mislabelled photos: worth a look. Suspect labels, near-duplicates and outliers in every "
                 "split: <a id='audit-link' href='audit.html'>what is wrong with the photos</a> (the audit stage's "
                 "page, beside this one).</p><div class='mistakes'>")
    for m in mistakes:
        thumb = images.get(m["path"])
        img = f"<img class='thumb' alt='{e(m['path'])}' src='{data_url(thumbnail(thumb), 'jpeg')}'>" if thumb else ""
        parts.append(f"<div class='mistake'>{img}<div>{e(m['path'])}</div><div>actual <b>{e(m['actual'])}</b>, "
                     f"predicted <b>{e(m['predicted'])}</b> ({m['confidence']:.3f})</div></div>")
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write(path: Path, page: str) -> None:
    with atomic_file(Path(path)) as handle:
        handle.write(page)
