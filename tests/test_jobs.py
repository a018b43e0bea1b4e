"""The background job registry: progress, cancel, captured errors."""
import threading
import time

from lems_core.jobs import CANCELLED, DONE, FAILED, JobCancelled, JobRegistry, for_each


def _steps(n, progress, cancel, pause=0.0):
    for i in range(n):
        progress((i + 1) / n, f"step {i + 1}/{n}")
        time.sleep(pause)
    return n * 10


def test_result_and_progress_reported():
    seen = []

    def work(progress, cancel):
        for i in range(4):
            progress((i + 1) / 4, f"step {i + 1}")
            seen.append(i)
        return "ok"

    job = JobRegistry().submit("count", work)
    state = job.wait(5)
    assert state.status == DONE and state.result == "ok"
    assert state.fraction == 1.0 and state.done and state.error is None
    assert seen == [0, 1, 2, 3]


def test_progress_visible_while_running():
    gate = threading.Event()

    def work(progress, cancel):
        progress(0.25, "a quarter")
        gate.wait(5)
        return 1

    job = JobRegistry().submit("halt", work)
    for _ in range(100):
        state = job.snapshot()
        if state.message == "a quarter":
            break
        time.sleep(0.01)
    assert state.status == "running" and state.fraction == 0.25 and not state.done
    gate.set()
    assert job.wait(5).status == DONE


def test_progress_clipped_to_unit_interval():
    job = JobRegistry().submit("clip", lambda progress, cancel: progress(7.0, "over"))
    job.wait(5)
    assert job.snapshot().fraction == 1.0


def test_cancel_stops_job_via_progress_callback():
    job = JobRegistry().submit("long", _steps, 10_000, pause=0.01)
    time.sleep(0.05)
    job.cancel()
    state = job.wait(5)
    assert state.status == CANCELLED
    assert state.fraction < 1.0
    assert state.elapsed < 5


def test_cancel_seen_by_function_polling_event():
    def poll(progress, cancel):
        while not cancel.is_set():
            time.sleep(0.005)
        return "stopped early"

    job = JobRegistry().submit("poll", poll)
    job.cancel()
    state = job.wait(5)
    assert state.status == CANCELLED and state.result == "stopped early"


def test_exception_is_reported_not_lost():
    def boom(progress, cancel):
        progress(0.5, "half way")
        raise RuntimeError("CUDA out of memory (simulated)")

    job = JobRegistry().submit("boom", boom)
    state = job.wait(5)
    assert state.status == FAILED
    assert state.error == "RuntimeError: CUDA out of memory (simulated)"
    assert "Traceback" in state.traceback and "boom" in state.traceback
    assert state.fraction == 0.5


def test_job_cancelled_is_exception_type():
    assert issubclass(JobCancelled, Exception)


def test_registry_lists_filters_and_clears():
    reg = JobRegistry()
    gate = threading.Event()
    a = reg.submit("a", lambda progress, cancel: 1, meta={"kind": "eval"})
    b = reg.submit("b", lambda progress, cancel: gate.wait(5), meta={"kind": "build"})
    a.wait(5)
    assert [j.name for j in reg.jobs()] == ["b", "a"]
    assert [j.name for j in reg.jobs("eval")] == ["a"]
    assert [j.id for j in reg.active()] == [b.id]
    assert reg.get(a.id) is a and reg.get("nope") is None and reg.get(None) is None
    assert reg.clear_finished() == 1
    gate.set()
    b.wait(5)
    assert reg.clear_finished() == 1 and reg.jobs() == []


def test_registry_keeps_bounded_history():
    reg = JobRegistry(keep=3)
    for i in range(6):
        reg.submit(str(i), lambda progress, cancel: None).wait(5)
    assert len(reg.jobs()) <= 4
    assert reg.jobs()[0].name == "5"


def test_args_and_kwargs_passed_through():
    def add(a, b, progress, cancel, scale=1):
        return (a + b) * scale

    assert JobRegistry().submit("add", add, 2, 3, scale=10).wait(5).result == 50


def test_for_each_runs_items_in_order_with_scaled_progress():
    seen = []

    def square(x, progress, cancel):
        progress(0.5, f"half of {x}")
        seen.append(x)
        return x * x

    reported = []
    job = JobRegistry().submit("each", for_each, square, [1, 2, 3])
    state = job.wait(5)
    assert state.status == DONE and state.result == [1, 4, 9] and seen == [1, 2, 3]

    for_each(square, [1, 2], lambda f, m: reported.append((f, m)), threading.Event())
    assert reported == [(0.25, "1/2: half of 1"), (0.75, "2/2: half of 2")]


def test_for_each_stops_on_cancel_and_reports_item_failure():
    def slow(x, progress, cancel):
        for _ in range(1000):
            progress(0.1, str(x))
            time.sleep(0.005)

    job = JobRegistry().submit("each", for_each, slow, [1, 2, 3])
    time.sleep(0.05)
    job.cancel()
    assert job.wait(5).status == CANCELLED

    def fail_on_two(x, progress, cancel):
        if x == 2:
            raise ValueError("bad plan 2")
        return x

    state = JobRegistry().submit("each", for_each, fail_on_two, [1, 2, 3]).wait(5)
    assert state.status == FAILED and state.error == "ValueError: bad plan 2"


def test_time_left_is_extrapolated_from_the_reported_fraction():
    """seconds_left: the time the fraction took, scaled to what is left; none before anything moved or after the end."""
    from lems_core.jobs import JobState, format_seconds

    now = time.time()
    state = JobState("1", "eval", "running", 0.25, "statistics", started=now - 40, finished=None, reported=now - 10)
    assert abs(state.seconds_left - (30 * 3 - 10)) < 1.0  # 30 s for a quarter: 90 s in all, 10 s of them already gone
    assert "about 80 s left" in state.status_line and state.status_line.startswith("statistics (40 s")
    assert JobState("1", "eval", "running", 0.0, "started", now - 40, None).seconds_left is None
    assert JobState("1", "eval", "done", 1.0, "done", now - 40, now, reported=now).seconds_left is None
    assert [format_seconds(s) for s in (4, 42, 200, 3900)] == ["4 s", "40 s", "3 min", "1 h 05 min"]

    gate = threading.Event()

    def work(progress, cancel):
        time.sleep(0.05)
        progress(0.5, "half")
        gate.wait(5)

    job = JobRegistry().submit("half", work)
    for _ in range(200):
        if job.snapshot().message == "half":
            break
        time.sleep(0.01)
    assert job.snapshot().reported is not None and job.snapshot().reported >= job.snapshot().started
    gate.set()
    job.wait(5)


def test_an_evaluation_job_takes_the_threads_the_others_leave_free(monkeypatch):
    """pipeline.free_core_threads: one thread on cores others keep busy, torch's own count on idle ones, restored."""
    import os

    import torch

    from lems_core import pipeline

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with pipeline.free_core_threads(lambda cpus: 9.0) as threads:
        assert threads == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pipeline.free_core_threads(lambda cpus: 0.0) as threads:
        assert threads == min(before, 4) == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_the_registry_refuses_a_job_beyond_its_cap_until_one_finishes():
    """max_active unfinished jobs: one more is a JobLimitError and starts nothing; a finished one frees a place."""
    import pytest

    from lems_core.jobs import MAX_ACTIVE_JOBS, JobLimitError

    reg = JobRegistry(max_active=2)
    gates = [threading.Event(), threading.Event()]
    started = []
    held = [reg.submit(f"hold {i}", lambda progress, cancel, gate=gate: gate.wait(5)) for i, gate in enumerate(gates)]
    with pytest.raises(JobLimitError, match="2 jobs are already queued or running"):
        reg.submit("one too many", lambda progress, cancel: started.append(1))
    assert [j.name for j in reg.jobs()] == ["hold 1", "hold 0"] and started == []
    held[0].cancel()  # cancel asked, but the job has not stopped yet: it still counts
    with pytest.raises(JobLimitError):
        reg.submit("still too many", lambda progress, cancel: started.append(1))
    gates[0].set()
    assert held[0].wait(5).done
    assert reg.submit("now there is room", lambda progress, cancel: started.append(1)).wait(5).status == DONE
    assert started == [1]
    gates[1].set()
    held[1].wait(5)
    assert MAX_ACTIVE_JOBS >= 3  # a build, an ARS training and an evaluation can run side by side
    with pytest.raises(ValueError, match="max_active"):
        JobRegistry(max_active=0)


def test_an_estimate_made_before_the_start_shows_until_progress_allows_one():
    from lems_core.jobs import JobState

    now = time.time()
    loading = JobState("1", "eval", "running", 0.01, "loading the model", now - 20, None, meta={"estimate_s": 1500},
                       reported=now - 19)
    assert loading.seconds_left is None and "estimated 25 min in all" in loading.status_line
    later = JobState("1", "eval", "running", 0.5, "perplexity", now - 100, None, meta={"estimate_s": 1500}, reported=now)
    assert "about" in later.status_line and "estimated" not in later.status_line
