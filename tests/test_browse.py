"""`dbr browse`: the page is rendered by a real headless Chromium (Debian's package, `make chromium`)
and checked through the DevTools protocol: counts, the acceptance tables, filters that really
filter when a select changes, no request beyond the page itself, and a screenshot."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from headless_chromium import CHROMIUM, Chromium
from typer.testing import CliRunner

from domainbed_reasoning import artefacts
from domainbed_reasoning.cli import app
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.browse import BrowseOptions, write_browser_page

OFFICE = get_spec("OfficeHome")
VISIBLE = "[...document.querySelectorAll('article.card')].filter((c) => c.getClientRects().length > 0)"


@pytest.fixture
def build(tmp_path: Path, make_chain_run) -> Path:
    """OfficeHome, 4 classes x 3 images per domain; Art's chainless image was never answered."""
    make_chain_run(tmp_path / "chains", tmp_path / "data", "OfficeHome", images_per_class=3, classes=4)
    folder = artefacts.chains_dir(tmp_path / "chains", OFFICE)
    shards = artefacts.candidates_dir(folder) / "part-fixture.parquet"
    hostile = "<script>window.injected = true</script> a dog? no, an <b>Alarm_Clock</b>"
    pl.read_parquet(shards).with_columns(
        pl.when(pl.col("reason") == "wrong_class").then(pl.lit(hostile)).otherwise("text").alias("text")
    ).write_parquet(shards)
    return folder


@pytest.fixture
def browser(tmp_path: Path):
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium: run `make chromium` (apt-get install -y chromium)")
    with Chromium(tmp_path / "profile") as chromium:
        yield chromium


def _select(browser: Chromium, name: str, value: str) -> list[dict]:
    """Choose an option as a user would (the select's value, then its change event); the cards left."""
    browser.evaluate(
        f"(() => {{ const s = document.getElementById('filter-{name}'); s.value = {value!r};"
        " s.dispatchEvent(new Event('change')); })()"
    )
    return browser.evaluate(
        f"{VISIBLE}.map((c) => ({{domain: c.dataset.domain, cls: c.dataset.class,"
        " status: c.dataset.status, reasons: c.dataset.reasons}))"
    )


def test_the_page_shows_counts_chains_and_filters_in_a_real_browser(
    build: Path, browser: Chromium, tmp_path: Path
) -> None:
    page = write_browser_page(build, options=BrowseOptions(per_class=3))
    browser.open(page.as_uri())

    cards = browser.evaluate("document.querySelectorAll('article.card').length")
    assert cards == 47, "every answered image (48 minus the one never answered)"
    assert browser.evaluate("document.getElementById('shown').textContent") == "47 of 47 images shown"
    rows = browser.evaluate(
        "[...document.querySelectorAll('#per-domain tr[data-group]')]"
        ".map((r) => [...r.cells].map((c) => c.textContent.trim()))"
    )
    assert rows[0] == ["Art", "12", "11", "11", "0", "1", "100.0%"]
    assert rows[1] == ["Clipart", "12", "12", "11", "1", "0", "91.7%"]
    assert browser.evaluate("document.querySelector('#per-class tr[data-group=\"Alarm_Clock\"] .rate').textContent") == "72.7%"

    accepted = "document.querySelector('article[data-status=\"accepted\"]')"
    stages = browser.evaluate(f"[...{accepted}.querySelectorAll('dl.chain dt')].map((d) => d.textContent)")
    assert stages == ["summary", "caption", "reasoning", "reflection", "conclusion"]
    exhausted = "document.querySelector('article[data-status=\"exhausted\"]')"
    reasons = browser.evaluate(f"[...{exhausted}.querySelectorAll('.candidate')].map((c) => c.dataset.reason)")
    assert sorted(reasons) == ["missing_stage"] * 3 + ["wrong_class"] * 3
    assert browser.evaluate("window.injected === undefined") is True, "answers are shown, never run"
    assert "<script>window.injected" in browser.evaluate(f"{exhausted}.querySelector('pre').textContent")

    clipart = _select(browser, "domain", "Clipart")
    assert len(clipart) == 12 and {card["domain"] for card in clipart} == {"Clipart"}
    assert browser.evaluate("document.getElementById('shown-count').textContent") == "12"
    clocks = _select(browser, "class", "Alarm_Clock")
    assert len(clocks) == 3 and {card["cls"] for card in clocks} == {"Alarm_Clock"}
    assert [card["status"] for card in _select(browser, "status", "exhausted")] == ["exhausted"]
    _select(browser, "status", "")
    _select(browser, "class", "")
    missing = _select(browser, "reason", "missing_stage")
    assert missing and all("missing_stage" in card["reasons"].split() for card in missing)
    assert len(missing) == 3 + 1, "image 1 of each class: three accepted in round 2, one exhausted"
    everything = _select(browser, "domain", "")
    _select(browser, "reason", "")
    assert len(everything) == 3 + 4 + 4 + 4, "Art's Alarm_Clock image 1 was never answered"
    assert len(browser.evaluate(VISIBLE)) == 47

    shot = browser.screenshot(tmp_path / "browse.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert all(url.startswith(("file://", "data:")) for url in browser.requested_urls()), (
        "the page asks the network for nothing"
    )


def test_the_page_is_one_file_that_loads_nothing_from_outside(build: Path) -> None:
    html = write_browser_page(build, options=BrowseOptions(per_class=1)).read_text()

    assert "default-src 'none'" in html, "its Content-Security-Policy forbids network requests"
    assert "http://" not in html and "https://" not in html
    assert html.count("<script>") == 1 and html.count('src="data:image/jpeg;base64,') == 16


def test_same_seed_same_sample(build: Path, tmp_path: Path) -> None:
    first = write_browser_page(build, tmp_path / "a.html", BrowseOptions(per_class=1, seed=3))
    again = write_browser_page(build, tmp_path / "b.html", BrowseOptions(per_class=1, seed=3))
    assert first.read_text() == again.read_text()


def test_bad_input_is_one_line(tmp_path: Path, build: Path) -> None:
    with pytest.raises(UserError, match=r"is not a folder: pass a build folder, e\.g\. runs/chains/PACS"):
        write_browser_page(tmp_path / "nothing")
    (tmp_path / "chains" / "PACS").mkdir()
    with pytest.raises(UserError, match=r"manifest\.parquet does not exist: build them first"):
        write_browser_page(tmp_path / "chains" / "PACS")
    with pytest.raises(UserError, match=r"--per-class 0: show at least 1 image"):
        BrowseOptions(per_class=0)


def test_cli_writes_the_page_beside_the_build(build: Path) -> None:
    result = CliRunner().invoke(app, ["browse", str(build), "--per-class", "1"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert (build / "browse.html").is_file()
    assert "shows 16 of 48 images (up to 1 per domain and class)" in result.output
