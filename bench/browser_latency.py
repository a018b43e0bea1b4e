"""Benchmark: the Allocate budget slider in a real browser, from key press to what the user sees.

Run as `python -m bench.browser_latency` (a few minutes). It starts `streamlit run app.py`
on a free localhost port (an empty temporary cache folder; the committed demo KFAC profile
through $LEMS_PROFILE_DIR, else a saved synthetic one), opens the Allocate page in Debian's
headless Chromium (/usr/bin/chromium through Playwright, as tests/e2e) and measures:

- **single press**: one ArrowLeft on the budget slider (a budget never solved before) to the
  plan summary showing the new budget, and to the page settled (the last animation frame with
  the script not running, 300 ms after the summary), median and max of ``--presses`` (>= 10);
- **burst**: ``--burst`` presses as fast as the keyboard sends them, from the last press to
  the summary at the final budget with the page settled.

Times are taken in the page's own clock (a keydown listener and a MutationObserver), so
Playwright's round trips are not counted. Where the time goes, per single press: the bytes
the server sent over the WebSocket, split by element type (protobuf ``ForwardMsg`` deltas),
the number of Plotly charts and tables on the page, and Chromium's own script / layout
time (CDP ``Performance.getMetrics``). The load average and thread counts are printed with
every figure, since the machine's other jobs slow the browser most of all.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROFILE = ROOT / "cache" / "demo" / "smollm2-135m-kfac"
CHROMIUM = Path(os.environ.get("LEMS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SUMMARY = ".st-key-plan_summary"

# Page-side probes: keydown times, summary text changes and "settled" moments, all in performance.now().
PROBE = """() => {
  const lat = window.__lat = {keys: [], summary: [], idle: []};
  document.addEventListener('keydown', () => lat.keys.push(performance.now()), true);
  let last = '';
  new MutationObserver(() => {
    const el = document.querySelector('%s');
    const text = el ? el.textContent : '';
    if (text !== last) { last = text; lat.summary.push([performance.now(), text]); }
    const app = document.querySelector("[data-testid='stApp']");
    if (app && app.getAttribute('data-test-script-state') === 'notRunning') {
      requestAnimationFrame(() => lat.idle.push(performance.now()));
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true,
                             attributeFilter: ['data-test-script-state']});
}""" % SUMMARY


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return (f"load average {one:.2f} / {five:.2f} (1/5 min), {os.cpu_count()} CPUs, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {threading.active_count()} Python thread(s)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_dir(tmp: Path) -> Path:
    """The committed demo KFAC profile, else a synthetic one saved under ``tmp``."""
    if (DEMO_PROFILE / "profile.json").is_file():
        return DEMO_PROFILE
    from lems_core.profile import synthetic_profile

    return synthetic_profile(num_blocks=30).save(tmp / "profiles" / "synthetic-30")


def start_app(tmp: Path, port: int, app: Path) -> subprocess.Popen:
    """`streamlit run app.py` on 127.0.0.1:port with an empty cache; returns once /_stcore/health says ok."""
    env = {**os.environ, "LEMS_CACHE_DIR": str(tmp / "cache"), "LEMS_PROFILE_DIR": str(profile_dir(tmp))}
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--global.developmentMode", "false",
           "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"]
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen(cmd, cwd=app.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited: {(tmp / 'streamlit.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("streamlit not healthy after 120 s")


class Traffic:
    """Bytes and frames the server sent over the WebSocket, with a per-element-type split."""

    def __init__(self):
        self.bytes, self.frames, self.by_type, self.count = 0, 0, Counter(), Counter()

    def attach(self, page) -> None:
        page.on("websocket", lambda ws: ws.on("framereceived", self._received))

    def _received(self, payload) -> None:
        data = payload if isinstance(payload, bytes) else payload.encode()
        self.bytes += len(data)
        self.frames += 1
        kind = _element_type(data)
        self.by_type[kind] += len(data)
        self.count[kind] += 1

    def take(self) -> tuple[int, int, Counter, Counter]:
        taken = (self.bytes, self.frames, self.by_type, self.count)
        self.bytes, self.frames, self.by_type, self.count = 0, 0, Counter(), Counter()
        return taken


def _element_type(data: bytes) -> str:
    """The element a ForwardMsg carries ("plotly_chart", "arrow_data_frame", ...) or its message type."""
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    try:
        msg = ForwardMsg.FromString(data)
    except Exception:  # noqa: BLE001 - a frame we cannot parse is counted as such
        return "unparsed"
    kind = msg.WhichOneof("type")
    if kind != "delta":
        return kind or "empty"
    delta = msg.delta.WhichOneof("type")
    return msg.delta.new_element.WhichOneof("type") if delta == "new_element" else delta


def chrome_times(cdp) -> dict[str, float]:
    """Chromium's cumulative script, layout and style seconds (CDP Performance domain)."""
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return {k: metrics.get(k, 0.0) for k in ("ScriptDuration", "LayoutDuration", "RecalcStyleDuration", "TaskDuration")}


def summary_budget(page) -> str:
    return page.locator(SUMMARY).inner_text()


def wait_settled(page, budget: str, since: float, timeout: float = 120_000) -> tuple[float, float]:
    """Page times (summary shows ``budget``, settled afterwards) of the first such moments after ``since``."""
    page.wait_for_function(
        """([budget, since]) => {
             const lat = window.__lat;
             const shown = lat.summary.find(([t, text]) => t >= since && text.includes('at budget ' + budget));
             if (!shown) return false;
             const app = document.querySelector("[data-testid='stApp']");
             const idle = lat.idle.find(t => t >= shown[0]);
             return idle !== undefined && app.getAttribute('data-test-script-state') === 'notRunning';
           }""", arg=[budget, since], timeout=timeout, polling=50)
    page.wait_for_timeout(300)  # a rerun whose state message is still in flight would show here
    return tuple(page.evaluate(
        """([budget, since]) => {
             const lat = window.__lat;
             const shown = lat.summary.find(([t, text]) => t >= since && text.includes('at budget ' + budget));
             const idle = lat.idle.filter(t => t >= shown[0]);
             return [shown[0], idle[idle.length - 1]];
           }""", [budget, since]))


def press(page, thumb, times: int) -> tuple[float, float]:
    """``times`` ArrowLeft presses; page times of the first and the last keydown."""
    before = page.evaluate("window.__lat.keys.length")
    for _ in range(times):
        thumb.press("ArrowLeft")
    keys = page.evaluate(f"window.__lat.keys.slice({before})")
    return keys[0], keys[-1]


def run(url: str, presses: int, bursts: int, burst: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        traffic = Traffic()
        traffic.attach(page)
        start = time.perf_counter()
        page.goto(f"{url}/allocate")
        page.wait_for_selector(f"{SUMMARY}:has-text('at budget 0.80')", timeout=180_000)
        page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=180_000)
        first_bytes, *_ = traffic.take()
        print(f"first load of /allocate (to the plan summary): {time.perf_counter() - start:.1f} s, "
              f"{first_bytes / 1e3:.0f} kB | {load_line()}", flush=True)
        page.evaluate(PROBE)
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        thumb = page.get_by_test_id("stSlider").filter(has_text="Budget: kept fraction").get_by_role("slider")
        thumb.focus()
        budget = 80

        def step(count: int) -> tuple[float, float, float]:
            nonlocal budget
            budget -= count
            first, last = press(page, thumb, count)
            shown, settled = wait_settled(page, f"0.{budget:02d}", first)
            return last, shown, settled

        for _ in range(2):  # warm-up: the first solves of a new budget range, Plotly's first redraws
            step(1)
        traffic.take()
        singles, sizes, types, counts, client = [], [], Counter(), Counter(), Counter()
        for _ in range(presses):
            before = chrome_times(cdp)
            key, shown, settled = step(1)
            after = chrome_times(cdp)
            sent, frames, by_type, count = traffic.take()
            singles.append((shown - key, settled - key))
            sizes.append((sent, frames))
            types.update(by_type)
            counts.update(count)
            client.update({k: after[k] - before[k] for k in after})
        to_summary = [s for s, _ in singles]
        to_settled = [s for _, s in singles]
        print(f"single press -> summary: median {statistics.median(to_summary):.0f} ms, max {max(to_summary):.0f} ms; "
              f"-> settled: median {statistics.median(to_settled):.0f} ms, max {max(to_settled):.0f} ms "
              f"(n={presses}) | {load_line()}", flush=True)
        print(f"  per press: WebSocket {statistics.median(b for b, _ in sizes) / 1e3:.1f} kB in "
              f"{statistics.median(f for _, f in sizes):.0f} frames (median); "
              f"{page.locator('.js-plotly-plot').count()} Plotly charts, "
              f"{page.get_by_test_id('stDataFrame').count()} tables on the page", flush=True)
        print("  bytes per press by element: " + ", ".join(
            f"{k} {v / presses / 1e3:.1f} kB ({counts[k] / presses:.0f})" for k, v in types.most_common(10)),
              flush=True)
        print("  Chromium per press: " + ", ".join(
            f"{k.removesuffix('Duration').lower()} {1000 * v / presses:.0f} ms" for k, v in client.items()), flush=True)
        settle = []
        for _ in range(bursts):
            key, shown, settled = step(burst)
            settle.append(settled - key)
        print(f"burst of {burst} presses -> settled after the last press: median {statistics.median(settle):.0f} ms, "
              f"max {max(settle):.0f} ms (n={bursts}) | {load_line()}", flush=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=12, help="single presses timed (>= 10)")
    parser.add_argument("--bursts", type=int, default=3, help="bursts timed")
    parser.add_argument("--burst", type=int, default=10, help="presses per burst")
    parser.add_argument("--app", type=Path, default=ROOT / "app.py",
                        help="the app to run (e.g. a copy of an earlier version, to compare in one session)")
    parser.add_argument("--url", help="an app already running (its Allocate page starts at budget 0.80)")
    args = parser.parse_args()
    if args.presses < 10:
        parser.error("--presses must be at least 10")
    if not CHROMIUM.is_file():
        sys.exit(f"{CHROMIUM} not found (apt-get install chromium)")
    print(f"# bench/browser_latency.py: {load_line()}", flush=True)
    if args.url:
        run(args.url, args.presses, args.bursts, args.burst)
        return
    with tempfile.TemporaryDirectory(prefix="lems-browser-") as tmp:
        port = free_port()
        proc = start_app(Path(tmp), port, args.app.resolve())
        try:
            run(f"http://127.0.0.1:{port}", args.presses, args.bursts, args.burst)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"# load average after: {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
