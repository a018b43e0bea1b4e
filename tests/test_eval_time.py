"""The evaluation time estimate shown before a long CPU run and while the model loads."""
import pytest

from lems_core.eval_time import estimate_eval, seconds_per_window, windows_of


def test_windows_follow_the_split_size_and_the_cap():
    assert windows_of("wikitext2", 2048, None) == 305_000 // 2048
    assert windows_of("wikitext2", 512, 8) == 8
    assert windows_of("my-file.txt", 2048, None) == 1  # unknown size: at least one window


def test_the_demo_quick_protocol_matches_its_timing_and_the_reference_is_far_longer():
    demo = dict(params=106_168_320, hidden=576, blocks=30)
    quick = estimate_eval(["wikitext2"], 512, 8, **demo)
    assert quick.windows == 8 and quick.low == pytest.approx(18, rel=0.1)  # bench/first_run.py: 18 s
    reference = estimate_eval(["wikitext2"], 2048, None, **demo)
    assert reference.low > 20 * 60 and reference.high == pytest.approx(2 * reference.low)
    assert seconds_per_window(2048, **demo) > 4 * seconds_per_window(512, **demo)  # attention grows with the window


def test_more_plans_cost_more_but_the_dense_pass_once():
    one, three = (estimate_eval(["wikitext2", "ptb"], 2048, None, 10**8, plans=n) for n in (1, 3))
    assert three.windows == 3 * one.windows and three.low == pytest.approx(3 * one.low)
    assert three.high - three.low == pytest.approx(one.high - one.low)
