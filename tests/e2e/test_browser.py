"""One real-browser run of the Allocate page: keyboard on the budget slider, plan summary,
plan JSON download. Marked `e2e`; skipped when Playwright or Chromium is missing."""
import json

import pytest

pytestmark = pytest.mark.e2e


def wait_for_app(page) -> None:
    """Wait until the app has loaded and its script is not running."""
    page.wait_for_selector("[data-testid='stAppViewContainer']")
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")


def _budget_down_to_075(page, summary) -> None:
    """Five ArrowLeft presses on the budget slider (0.80 -> 0.75), then wait for the re-solved summary."""
    from playwright.sync_api import expect

    thumb = page.get_by_test_id("stSlider").first.get_by_role("slider")
    thumb.focus()
    for _ in range(5):
        thumb.press("ArrowLeft")
    expect(summary).to_contain_text("at budget 0.75", timeout=30_000)
    wait_for_app(page)


def test_budget_slider_updates_plan_and_download_parses(browser_page, app_url):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(f"{app_url}/allocate")
    wait_for_app(page)
    summary = page.locator(".st-key-plan_summary")
    expect(summary).to_contain_text("at budget 0.80", timeout=30_000)
    before = summary.inner_text()

    _budget_down_to_075(page, summary)
    assert summary.inner_text() != before

    with page.expect_download() as download:
        page.get_by_test_id("stDownloadButton").filter(has_text="Download plan JSON").get_by_role("button").click()
    doc = json.loads(open(download.value.path()).read())
    assert download.value.suggested_filename.endswith(".json")
    assert doc["schema"] == "lems-rank-plan/1"
    assert doc["method"] == "lems" and doc["budget"] == pytest.approx(0.75)
    assert doc["summary"]["realised_ratio"] <= 0.75 + 1e-9


def _download_plan(page) -> dict:
    with page.expect_download() as download:
        page.get_by_test_id("stDownloadButton").filter(has_text="Download plan JSON").get_by_role("button").click()
    return json.loads(open(download.value.path()).read())


def test_state_survives_a_page_switch(browser_page, app_url):
    """#13: the budget holds across Sensitivity and back, and the kept plan is still the 0.75 one.

    A constraint changing the plan is tested with AppTest (tests/test_app.py); driving the
    multiselect in the browser was flaky here and is left for later."""
    from playwright.sync_api import expect

    page = browser_page
    page.goto(f"{app_url}/allocate")
    wait_for_app(page)
    summary = page.locator(".st-key-plan_summary")
    expect(summary).to_contain_text("at budget 0.80", timeout=30_000)
    _budget_down_to_075(page, summary)

    page.get_by_test_id("stSidebarNav").get_by_text("Sensitivity").click()
    wait_for_app(page)
    expect(page.get_by_role("heading", name="Sensitivity")).to_be_visible()
    page.get_by_test_id("stSidebarNav").get_by_text("Allocate").click()
    wait_for_app(page)
    expect(summary).to_contain_text("at budget 0.75", timeout=30_000)
    expect(page.get_by_test_id("stSliderThumbValue").first).to_have_text("0.75")

    plan = _download_plan(page)
    assert plan["budget"] == pytest.approx(0.75) and "constraints" not in plan
