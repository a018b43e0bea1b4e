"""Fixtures for the browser tests: `streamlit run app.py` on a free port, and Debian's Chromium.

The tests skip (with the reason) when Playwright or /usr/bin/chromium is missing.
Playwright's own browser download (`playwright install`) is not used: the system
Chromium is launched through `executable_path`.
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("LEMS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
STARTUP_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + STARTUP_SECONDS
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit not healthy after {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def profile_env(tmp_path_factory) -> dict:
    """A fresh cache folder holding a saved synthetic profile, and a demo folder whose shipped
    results (``results.json``, tests/shipped_fixture.py) are of that profile, as environment variables."""
    from shipped_fixture import fixture_records, write_shipped

    from lems_core.profile import synthetic_profile

    cache = tmp_path_factory.mktemp("e2e-cache")
    profile = synthetic_profile()
    folder = profile.save(cache / "profiles" / "synthetic-e2e")
    shipped = write_shipped(tmp_path_factory.mktemp("e2e-demo") / "results.json",
                            fixture_records(profile, methods=("lems", "uniform", "mrcs")), note="e2e fixture")
    return {"LEMS_CACHE_DIR": str(cache), "LEMS_PROFILE_DIR": str(folder), "LEMS_SHIPPED_RESULTS": str(shipped)}


@pytest.fixture(scope="module")
def app_url(profile_env, tmp_path_factory):
    """Base URL of `streamlit run app.py`, stopped after the module."""
    port = _free_port()
    log = tmp_path_factory.mktemp("e2e-log") / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--global.developmentMode", "false",
           "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **profile_env}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def chromium():
    """A headless system Chromium driven by Playwright's sync API."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    manager = sync_api.sync_playwright().start()
    browser = manager.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()
        manager.stop()


@pytest.fixture
def browser_page(chromium):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()

