"""evaluate-vae's report.html as a user's browser renders it: headless Chromium (Debian's `chromium`, driven
by Playwright) opens the page a real evaluation wrote, every picture decodes, nothing is logged as an
error, the metric table has rows, and a screenshot of the page is kept in the evaluation's MLflow run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Checked when the module is collected, so a machine without Chromium skips before any server starts.
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (Debian package `chromium`: apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")

pytestmark = pytest.mark.usefixtures("prefect_server")

K = 2
#: every <img>'s alt text and decoded width (0: the browser could not decode it); the metric table's value rows
PAGE_STATE = """() => ({
    images: [...document.images].map(i => [i.alt, i.complete ? i.naturalWidth : 0]),
    metric_rows: document.querySelectorAll("table.metrics td.value").length,
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium: the system's, as Playwright's own browser download needs the internet."""
    with sync_api.sync_playwright() as playwright:
        # Chromium refuses to start as root (as CI runs) with its sandbox on.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def evaluated(browser, tmp_path_factory, mnist_home, register_model) -> Iterator[Any]:
    """An untrained model evaluated on the test split of 300 real MNIST images (43), with the fewest map
    points and sampled rows the request takes (the page, not its numbers, is under test): its EvaluateResult.
    Asks for the browser first, so that a Chromium that cannot start fails before the evaluation runs."""
    from flows.evaluate import evaluate_vae
    from vae_core.requests import EvaluateRequest

    with mnist_home(tmp_path_factory.mktemp("browser_home"), limit=300):
        version = register_model(epochs=0)
        yield evaluate_vae(EvaluateRequest(model=f"models:/vae-mnist/{version}", iw_samples=K, map_points=10,
                                           sample_rows=10, promote=False))


def _render(browser: Any, page_file: Path, screenshot: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """Open `page_file` as file:// and let it load: (PAGE_STATE, the console's errors and uncaught exceptions);
    a full-page PNG to `screenshot` when given."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(page_file.as_uri(), wait_until="load")
        state = page.evaluate(PAGE_STATE)
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        return state, errors
    finally:
        page.close()


def _broken_copies(page: str, folder: Path) -> tuple[Path, Path]:
    """The page with its first picture's PNG bytes corrupted, and the page with a script that logs an error."""
    corrupt = folder / "corrupt_image.html"
    corrupt.write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    console = folder / "console_error.html"
    console.write_text(page.replace("</body>", '<script>console.error("broken page")</script></body>', 1))
    return corrupt, console


@pytest.mark.slow
def test_report_renders_in_chromium_and_its_screenshot_is_logged(browser, evaluated, tmp_path):
    from flows.tracking import runs as tracking

    report = Path(evaluated.report["report"])
    shot = tmp_path / "report.png"
    state, errors = _render(browser, report, shot)
    assert len(state["images"]) == 6 and all(width > 0 for _, width in state["images"]), state["images"]
    assert not errors, errors
    assert state["metric_rows"] >= len(evaluated.metrics) > 0

    folder = f"evaluation/test_k{K}"
    tracking.client().log_artifact(evaluated.run_id, str(shot), artifact_path=folder)
    logged = {Path(a.path).name: a for a in tracking.client().list_artifacts(evaluated.run_id, folder)}
    assert {"report.html", "report.png"} <= logged.keys() and logged["report.png"].file_size > 10_000

    # The checks catch what breaks a page: a picture that does not decode, an error in the console.
    corrupt, console = _broken_copies(report.read_text(), tmp_path)
    state, errors = _render(browser, corrupt)
    assert [alt for alt, width in state["images"] if width == 0] == ["reconstructions"] and not errors
    state, errors = _render(browser, console)
    assert errors == ["broken page"] and all(width > 0 for _, width in state["images"])
