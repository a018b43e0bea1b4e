"""A new user's first minutes in a real browser: the start links on Home, the Quick default and the
confirmation before a long CPU run on Compress & evaluate, the constraints expander staying open,
a loadconfig downloaded from Allocate and uploaded back, and an app that fetches nothing from
outside this machine. Marked `e2e`; skipped when Playwright or Chromium is missing.

Nothing here starts an evaluation: the confirmation is answered with "Back".
"""
import json

import pytest

from test_browser import open_allocate, wait_for_app

pytestmark = pytest.mark.e2e


def _nav(page, title: str) -> None:
    """Go to a page through the sidebar (the session, and what it keeps, stays the same)."""
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    wait_for_app(page)


def test_home_start_links_open_the_pages(browser_page, app_url):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(app_url)
    wait_for_app(page)
    expect(page.get_by_text("Layer-wise Error Modeling Search")).to_be_visible()
    start = page.locator(".st-key-start_here")
    for label, path, heading in (("2. Allocate ranks under a budget", "/allocate", "Allocate"),
                                 ("3. Compress and evaluate", "/compress", "Compress & evaluate"),
                                 ("1. Explore the spectra", "/spectra", "Spectra")):
        start.get_by_test_id("stPageLink").filter(has_text=label).click()
        wait_for_app(page)
        expect(page).to_have_url(f"{app_url}{path}")
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        _nav(page, "Home")


def test_quick_is_the_default_and_a_reference_run_asks_first(browser_page, app_url):
    from playwright.sync_api import expect

    page = browser_page
    open_allocate(page, app_url)  # keeps a plan, so Plans is not empty
    _nav(page, "Compress & evaluate")
    quick = page.get_by_test_id("stCheckbox").filter(has_text="Quick protocol").locator("input")
    window_cap = page.get_by_test_id("stNumberInput").filter(has_text="Window cap").locator("input")
    expect(quick).to_be_checked()
    expect(window_cap).to_be_disabled()

    quick.click(force=True)
    wait_for_app(page)
    expect(quick).not_to_be_checked()
    expect(window_cap).to_be_enabled()
    page.get_by_role("button", name="Compress & evaluate").click()
    wait_for_app(page)
    confirm = page.locator(".st-key-confirm_reference")
    expect(confirm).to_contain_text("The reference protocol on a CPU is a long run")
    expect(confirm).to_contain_text("This is an estimate")
    expect(page.get_by_test_id("stProgress")).to_have_count(0)  # nothing started

    confirm.get_by_role("button", name="Back (change the settings)").click()
    wait_for_app(page)
    expect(page.locator(".st-key-confirm_reference")).to_have_count(0)
    _nav(page, "Allocate")
    _nav(page, "Compress & evaluate")
    expect(page.get_by_test_id("stCheckbox").filter(has_text="Quick protocol").locator("input")).not_to_be_checked()


def test_the_constraints_expander_stays_open_while_a_constraint_is_set(browser_page, app_url):
    from playwright.sync_api import expect

    page = browser_page
    summary = open_allocate(page, app_url)
    before = summary.inner_text()
    expander = page.get_by_test_id("stExpander").filter(has_text="Layer constraints")
    expander.locator("summary").first.click()
    names = expander.get_by_test_id("stTextInput").filter(has_text="Lock dense: layer names").locator("input")
    names.fill("*.layers.3.*")
    names.press("Enter")
    expect(summary).not_to_have_text(before, timeout=60_000)
    wait_for_app(page)
    expect(expander.locator("details").first).to_have_attribute("open", "")
    expect(expander).to_contain_text("Active:")
    expect(names).to_be_visible()


def test_a_downloaded_loadconfig_uploads_back(browser_page, app_url, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    open_allocate(page, app_url)
    with page.expect_download() as download:
        page.get_by_test_id("stDownloadButton").filter(has_text="Download loadconfig JSON").get_by_role("button").click()
    saved = tmp_path / "plan_loadconfig.json"  # the uploader takes .json names only
    download.value.save_as(saved)
    config = json.loads(saved.read_text())
    assert config and "schema" not in config and all(0 < v <= 1 for v in config.values())  # {layer: ratio}
    upload = page.get_by_test_id("stExpander").filter(has_text="Upload a plan")
    upload.locator("summary").first.click()
    upload.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(saved)
    wait_for_app(page)
    expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text("loadconfig plan", timeout=30_000)
    expect(page.get_by_test_id("stAlertContentError")).to_have_count(0)


def test_nothing_is_fetched_from_outside_and_there_is_no_deploy_button(browser_page, app_url):
    from playwright.sync_api import expect

    page, outside = browser_page, []

    def route(request_route):
        url = request_route.request.url
        if url.startswith(app_url) or url.startswith("data:"):
            request_route.continue_()
        else:
            outside.append(url)
            request_route.abort()

    page.route("**/*", route)
    for path in ("", "spectra", "sensitivity", "allocate", "compress", "prediction"):
        page.goto(f"{app_url}/{path}")
        wait_for_app(page)
    favicon = page.evaluate("document.querySelector(\"link[rel='shortcut icon']\").href")
    assert favicon.startswith("data:"), favicon
    expect(page.get_by_test_id("stAppDeployButton")).to_have_count(0)
    assert not outside, outside
