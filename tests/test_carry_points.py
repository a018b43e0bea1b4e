"""scripts/carry_measured_points.py --nll: NLL points carry only between profiles with the same factors."""
import copy

import numpy as np
import pytest

from lems_core.profile import synthetic_profile
from scripts.carry_measured_points import carry_nll


def _pair():
    target = synthetic_profile(seed=3)
    target.calibration = {"dataset": "wikitext2", "split": "validation", "n_samples": 16, "seq_len": 512, "seed": 42,
                          "n_search": 2, "sampling": "reference"}  # the demo's: 8192 tokens, tolerance ~1e-3
    source = copy.deepcopy(target)
    n = len(target.layers)
    source.measured_nll = {r: np.full(n, 2.5 + r) for r in (0.4, 0.5)}
    return source, target


def test_nll_points_carry_and_kl_points_stay():
    source, target = _pair()
    kl_before = {r: v.copy() for r, v in target.measured.items()}
    source.measured[0.4] = np.ones(len(source.layers))  # the rebuild's own KL: must not replace the target's
    # spectra equal up to float32 summation round-off still carry
    name = target.layers[0].name
    source.spectra[name] = source.spectra[name] * (1 + np.finfo(np.float32).eps)
    assert carry_nll(source, target) == [0.4, 0.5]
    assert set(target.measured_nll) == {0.4, 0.5} and np.array_equal(target.measured_nll[0.4], source.measured_nll[0.4])
    assert target.measured.keys() == kl_before.keys()
    assert all(np.array_equal(target.measured[r], kl_before[r]) for r in kl_before)
    assert target.meta["nll_points"]["ratios"] == [0.4, 0.5]


def test_nll_points_of_other_factors_are_refused():
    source, target = _pair()
    name = target.layers[5].name
    source.spectra[name] = source.spectra[name] * 1.01
    with pytest.raises(SystemExit, match="spectra differ"):
        carry_nll(source, target)
    assert not target.measured_nll
