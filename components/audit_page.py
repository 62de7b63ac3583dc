"""reports/audit.html: the audit's findings as a page a person opens (self-contained, like evaluate.html).

Suspect labels (the photo, its given and suggested class, cleanlab's label score), near-duplicate pairs
side by side with their splits (leakage marked), outliers; each with its path as ingest names it, ready
to paste into the file ``data.exclude`` names. Thumbnails are read from the examples, as ingest stored
the photos (upright).
"""
from __future__ import annotations

import html
from pathlib import Path

from components import records
from components.report import STYLE, data_url, thumbnail, write as write_page

AUDIT_STYLE = STYLE + """
.pair { display: flex; gap: 8px; border: 1px solid #ddd; padding: 6px; }
.leak { border-color: #c33; } .leak b.leakage { color: #c33; }
code { font-size: 0.9em; }
"""


def stored_photos(examples: Path, wanted: set[str]) -> dict[str, bytes]:
    """key -> stored image bytes of the ``wanted`` photos, read from every split's shards."""
    return {record.key: record.image for record in records.read_all(examples) if record.key in wanted}


def _photo(path: str, photos: dict[str, bytes], caption: str) -> str:
    e = html.escape
    image = photos.get(path)
    img = f"<img class='thumb' alt='{e(path)}' src='{data_url(thumbnail(image), 'jpeg')}'>" if image else ""
    return f"<div class='mistake'>{img}<div><code>{e(path)}</code></div><div>{caption}</div></div>"


def render(report: dict, photos: dict[str, bytes], listed: int, exclude_file: str) -> str:
    e = html.escape
    s = report["summary"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>graftline: what is wrong with the photos"
             f"</title><style>{AUDIT_STYLE}</style></head><body>",
             f"<h1>What is wrong with the photos ({s['photos']} photos, every split)</h1>",
             "<p class='headline'>" + "".join(
                 f"<span>{name}: <b>{s[key]}</b></span>" for name, key in (
                     ("label issues", "label_issues"), ("near-duplicate pairs", "near_duplicate_pairs"),
                     ("across splits (leakage)", "leakage_pairs"), ("outliers", "outliers"))) + "</p>",
             f"<p>Found by cleanlab from the base's features, with probabilities from {s['folds']}-fold "
             f"cross-validation of a logistic regression (its accuracy: {s['cross_validated_accuracy']:.3f}); "
             f"near-duplicates also by perceptual hash (at most {s['hash_bits']} of 64 bits apart). "
             f"To leave a photo out, add its path as a line to <code>{e(exclude_file)}</code> and run again: "
             "ingest drops it and only what changed re-runs. reports/audit.json lists every finding.</p>"]
    issues = report["label_issues"][:listed]
    parts.append(f"<h2 id='label-issues'>Label issues: the {len(issues)} most suspect of "
                 f"{len(report['label_issues'])}</h2><div class='mistakes'>")
    parts += [_photo(i["path"], photos, f"given <b>{e(i['given'])}</b>, suggested <b>{e(i['suggested'])}</b> "
                                        f"(score {i['score']:.3f}; {e(i['split'])})") for i in issues]
    pairs = report["near_duplicates"][:listed]
    parts.append(f"</div><h2 id='near-duplicates'>Near-duplicates: the {len(pairs)} closest pairs of "
                 f"{len(report['near_duplicates'])}</h2><div class='mistakes'>")
    for pair in pairs:
        leak = pair["splits"][0] != pair["splits"][1]
        note = "<b class='leakage'>leakage</b>: " if leak else ""
        parts.append(f"<div class='pair{' leak' if leak else ''}'>" + "".join(
            _photo(path, photos, f"{note}{e(split)}; hashes {pair['hash_bits']} bits apart, "
                                 f"features {pair['distance']:.4f}")
            for path, split in zip(pair["paths"], pair["splits"])) + "</div>")
    outliers = report["outliers"][:listed]
    parts.append(f"</div><h2 id='outliers'>Outliers: the {len(outliers)} most unusual of "
                 f"{len(report['outliers'])}</h2><div class='mistakes'>")
    parts += [_photo(o["path"], photos, f"score {o['score']:.3f}; {e(o['split'])}") for o in outliers]
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write(path: Path, report: dict, examples: Path, listed: int, exclude_file: str) -> None:
    shown = {i["path"] for i in report["label_issues"][:listed]} | {o["path"] for o in report["outliers"][:listed]}
    shown |= {p for pair in report["near_duplicates"][:listed] for p in pair["paths"]}
    write_page(path, render(report, stored_photos(examples, shown), listed, exclude_file))
