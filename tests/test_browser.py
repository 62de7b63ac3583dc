"""What a person sees, checked in a real browser (headless Chromium, Debian's package), with no network:
reports/evaluate.html, reports/audit.html (linked from it) and the page `graftline plots` writes with
`dvc plots show` (local vega scripts)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
# As the machines here need (see the tool library's notes): no sandbox as root, no GPU, and none of
# Chromium's background connections, which a closed network refuses many at a time.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get where it is missing (as `make test` installs everything else)."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.fail("headless Chromium is needed: install Debian's chromium package")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
    return CHROMIUM


def open_offline(chromium: Path, page_file: Path, until: str) -> dict:
    """Open ``page_file`` with every network request refused; wait for the JS expression ``until``;
    return what the page shows (via ``until``'s companion probe) plus console errors and refused URLs."""
    from playwright.sync_api import sync_playwright

    errors, refused = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def refuse(route):
                refused.append(route.request.url)
                route.abort()

            page.route("http*://**/*", refuse)
            page.goto(page_file.resolve().as_uri())
            page.wait_for_function(until, timeout=30_000)
            shown = page.evaluate(PROBE)
            page.screenshot(path=str(page_file.with_suffix(".png")), full_page=True)
        finally:
            browser.close()
    return {**shown, "errors": errors, "refused": refused}


PROBE = """() => ({
  images: [...document.images].map(i => ({id: i.id, cls: i.className, width: i.naturalWidth})),
  confusionRows: document.querySelectorAll('#confusion tr').length,
  perClassRows: document.querySelectorAll('#per-class tr').length,
  vegaViews: document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length,
  vegaDivs: document.querySelectorAll('.vega-embed').length,
  title: document.title,
  sections: [...document.querySelectorAll('h2[id]')].map(h => h.id),
  pairs: document.querySelectorAll('.pair').length,
})"""


def test_the_evaluation_report_shows_its_figures_and_thumbnails_offline(project, chromium, tmp_path):
    report = tmp_path / "evaluate.html"
    shutil.copy(project.first / "reports" / "evaluate.html", report)
    mistakes = json.loads((project.first / "reports" / "evaluate.json").read_text())["mistakes"]
    shown = open_offline(chromium, report, "() => [...document.images].every(i => i.complete)")
    thumbs = [i for i in shown["images"] if i["cls"] == "thumb"]
    assert len(thumbs) == len(mistakes) > 0 and all(t["width"] > 0 for t in thumbs), shown["images"]
    by_id = {i["id"]: i["width"] for i in shown["images"] if i["id"]}
    assert by_id["confusion-png"] > 0 and by_id["curves"] > 0, by_id
    assert shown["confusionRows"] == 1 + 5 and shown["perClassRows"] == 1 + 5
    assert shown["errors"] == [] and shown["refused"] == [], shown
    # The README's screenshot is this browser's.
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_the_audit_page_is_linked_from_the_evaluation_page_and_shows_its_photos(project, chromium, tmp_path):
    for name in ("evaluate.html", "audit.html"):
        shutil.copy(project.first / "reports" / name, tmp_path / name)
    audit = json.loads((project.first / "reports" / "audit.json").read_text())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # the link a person follows from the evaluation page
        browser = p.chromium.launch(executable_path=str(chromium), args=ARGS)
        try:
            page = browser.new_page()
            page.goto((tmp_path / "evaluate.html").resolve().as_uri())
            page.click("#audit-link")
            page.wait_for_load_state()
            assert page.url.endswith("/audit.html") and "wrong with the photos" in page.title()
        finally:
            browser.close()
    shown = open_offline(chromium, tmp_path / "audit.html", "() => [...document.images].every(i => i.complete)")
    assert shown["sections"] == ["label-issues", "near-duplicates", "outliers"]
    listed = min(30, len(audit["label_issues"])) + min(30, len(audit["outliers"]))  # audit.listed: 30
    thumbs = [i for i in shown["images"] if i["cls"] == "thumb"]
    assert len(thumbs) == listed + 2 * shown["pairs"] > 0 and all(t["width"] > 0 for t in thumbs)
    assert shown["pairs"] == min(30, len(audit["near_duplicates"]))
    assert shown["errors"] == [] and shown["refused"] == [], shown


def test_dvc_plots_draws_curves_and_confusion_with_local_scripts(project, chromium, tmp_path):
    from test_ci_evaluate import copy_project

    root = copy_project(project, tmp_path / "project")
    run(["graftline", "plots", "--out", "dvc_plots"], root, project.env, tmp_path / "plots.log")
    page = root / "dvc_plots" / "index.html"
    assert "cdn.jsdelivr.net" not in page.read_text()
    shown = open_offline(chromium, page, "() => document.querySelectorAll('.vega-embed canvas, .vega-embed svg')"
                                         ".length >= 3")
    assert shown["vegaViews"] >= 3 and shown["vegaDivs"] >= 3, shown  # accuracy, loss, confusion
    static = [i for i in shown["images"] if i["width"] > 0]  # learning_curves.png and confusion.png
    assert len(static) >= 2, shown["images"]
    assert shown["errors"] == [] and shown["refused"] == [], shown
