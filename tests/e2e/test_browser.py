"""Real-browser runs of the app: keyboard on the budget slider, plan summary, plan JSON download,
state across a page switch, a layer constraint changing the plan, the shipped results on a fresh
cache. Marked `e2e`; skipped when Playwright or Chromium is missing.

Robust on a loaded 2-core CI box: every step waits for what it changes to be rendered (the
plan summary's text, a chart's title) with generous timeouts, and inputs are typed into text
fields (a multiselect's option list was seen never to open in a clean-clone CI run).
"""
import json

import pytest

pytestmark = pytest.mark.e2e


def wait_for_app(page) -> None:
    """Wait until the app has loaded and its script is not running."""
    page.wait_for_selector("[data-testid='stAppViewContainer']")
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")


def budget_slider(page):
    """The Allocate page's budget slider (the error-model sliders are on the page too, in an expander)."""
    return page.get_by_test_id("stSlider").filter(has_text="Budget: kept fraction")


def open_allocate(page, app_url):
    """Open Allocate and wait for the LEMS summary at the default budget 0.80; return its locator."""
    from playwright.sync_api import expect

    page.goto(f"{app_url}/allocate")
    wait_for_app(page)
    summary = page.locator(".st-key-plan_summary")
    expect(summary).to_contain_text("at budget 0.80", timeout=30_000)
    return summary


def _budget_down_to_075(page, summary) -> None:
    """Five ArrowLeft presses on the budget slider (0.80 -> 0.75), then wait for the re-solved summary."""
    from playwright.sync_api import expect

    thumb = budget_slider(page).get_by_role("slider")
    thumb.focus()
    for _ in range(5):
        thumb.press("ArrowLeft")
    expect(summary).to_contain_text("at budget 0.75", timeout=30_000)
    wait_for_app(page)


def test_budget_slider_updates_plan_and_download_parses(browser_page, app_url):

    page = browser_page
    summary = open_allocate(page, app_url)
    before = summary.inner_text()

    _budget_down_to_075(page, summary)
    assert summary.inner_text() != before

    doc = _download_plan(page)
    assert doc["schema"] == "lems-rank-plan/1"
    assert doc["method"] == "lems" and doc["budget"] == pytest.approx(0.75)
    assert doc["summary"]["realised_ratio"] <= 0.75 + 1e-9


def _download_plan(page) -> dict:
    """Click "Download plan JSON" and parse what the browser saved (a .json file)."""
    with page.expect_download() as download:
        page.get_by_test_id("stDownloadButton").filter(has_text="Download plan JSON").get_by_role("button").click()
    assert download.value.suggested_filename.endswith(".json")
    return json.loads(open(download.value.path()).read())


def test_state_survives_a_page_switch(browser_page, app_url):
    """#13: the budget holds across Sensitivity and back, and the kept plan is still the 0.75 one."""
    from playwright.sync_api import expect

    page = browser_page
    summary = open_allocate(page, app_url)
    _budget_down_to_075(page, summary)

    page.get_by_test_id("stSidebarNav").get_by_text("Sensitivity").click()
    wait_for_app(page)
    expect(page.get_by_role("heading", name="Sensitivity")).to_be_visible()
    page.get_by_test_id("stSidebarNav").get_by_text("Allocate").click()
    wait_for_app(page)
    expect(summary).to_contain_text("at budget 0.75", timeout=30_000)
    expect(budget_slider(page).get_by_test_id("stSliderThumbValue")).to_have_text("0.75")

    plan = _download_plan(page)
    assert plan["budget"] == pytest.approx(0.75) and "constraints" not in plan


def test_a_layer_constraint_changes_the_plan(browser_page, app_url):
    """#13: locking block 3 dense by a name pattern (a text input, Enter) re-solves LEMS with it."""
    from playwright.sync_api import expect

    page = browser_page
    summary = open_allocate(page, app_url)
    before = summary.inner_text()

    page.get_by_test_id("stExpander").filter(has_text="Layer constraints").locator("summary").first.click()
    names = page.get_by_test_id("stTextInput").filter(has_text="Lock dense: layer names").locator("input")
    names.fill("*.layers.3.*")
    names.press("Enter")
    expect(summary).not_to_have_text(before, timeout=60_000)  # re-solved: block 3 dense, others pay for it
    wait_for_app(page)
    expect(summary).to_contain_text("LEMS at budget 0.80", timeout=30_000)

    plan = _download_plan(page)
    assert plan["method"] == "lems" and plan["constraints"]["lock_dense"] == ["name:*.layers.3.*"]
    block3 = [layer for layer in plan["layers"] if ".layers.3." in layer["name"]]
    assert len(block3) == 7 and all(layer["rank"] == "dense" for layer in block3)
    assert plan["summary"]["realised_ratio"] <= 0.8 + 1e-9


def test_shipped_results_plot_on_a_fresh_cache(browser_page, app_url):
    """#13: with nothing evaluated in this cache, Compress & evaluate plots the shipped LEMS, Uniform, MRCS results."""
    from playwright.sync_api import expect

    page = browser_page
    page.goto(f"{app_url}/compress")
    wait_for_app(page)
    plot = page.locator(".js-plotly-plot").filter(has_text="Perplexity on wikitext2")
    expect(plot).to_be_visible(timeout=60_000)
    for method in ("LEMS", "Uniform", "MRCS"):
        expect(plot.locator(".legendtext", has_text=method).first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("No stored results for this model yet")).to_have_count(0)
