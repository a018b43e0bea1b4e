"""lems_core.prediction_check: predicted Σ ε vs measured KL / PPL, and per-layer fitted curves vs measured points."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from shipped_fixture import fixture_record, fixture_records

from lems_core.error_model import ErrorModelParams, predicted_errors, spectral_shape
from lems_core.prediction_check import (OVERALL, average_ranks, fitted_curve, layer_fits, predicted_vs_measured,
                                        profile_error_model, spearman)
from lems_core.profile import synthetic_profile


@pytest.fixture(scope="module")
def profile():
    p = synthetic_profile()
    p.bias_fit = {"ratios": {"0.6": {"alpha": 1.0, "gamma": 2.0}, "0.8": {"alpha": 0.5, "gamma": 3.0}}}
    return p


@pytest.fixture(scope="module")
def records(profile):
    return fixture_records(profile, methods=("lems", "uniform", "mrcs"), budgets=(0.6, 0.7, 0.8))


@pytest.mark.parametrize("x, y", [([1, 2, 3, 4], [1, 3, 2, 4]), ([1, 1, 2, 3, 3], [5, 4, 4, 1, 2]),
                                  ([0.1, 5, 2, np.inf], [3, 2, 9, 10])])
def test_spearman_matches_scipy_with_ties_and_inf(x, y):
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_spearman_needs_three_points_and_spread():
    assert spearman([1, 2], [2, 1]) is None
    assert spearman([1, 2, 3], [4, 4, 4]) is None
    assert spearman([1, 2, 3, np.nan], [1, 2, 3, 0]) == pytest.approx(1.0)  # NaN pairs dropped
    assert list(average_ranks([3.0, 1.0, 3.0])) == [2.5, 1.0, 2.5]
    with pytest.raises(ValueError, match="equally long"):
        spearman([1, 2, 3], [1, 2])


def test_the_error_model_is_the_profiles_fit_nearest_the_budget(profile):
    params, source = profile_error_model(profile, 0.75)
    assert (params.alpha, params.gamma, source) == (0.5, 3.0, "profile fit at 0.8")
    assert profile_error_model(profile, 0.62)[0].gamma == 2.0
    unfitted = synthetic_profile()
    params, source = profile_error_model(unfitted, 0.8)
    assert (params.alpha, params.gamma) == (0.0, 5.0) and "no bias fit" in source
    assert params.use_scale and params.ref_ratio == unfitted.ref_ratio


def test_predicted_sum_and_correlations(profile, records):
    check = predicted_vs_measured(profile, records)
    assert len(check.points) == len(records) and not check.skipped
    point, record = check.points[0], records[0]
    params, _ = profile_error_model(profile, record["budget"])
    assert point.predicted == pytest.approx(sum(predicted_errors(profile, record["ranks"], params).values()))
    assert point.kl == record["kl"] and point.ppl == record["ppl"]["wikitext2"] and point.protocol == "quick"
    assert [c.group for c in check.correlations] == ["lems", "uniform", "mrcs", OVERALL]
    overall = check.correlation(OVERALL)
    assert (overall.n_kl, overall.kl, overall.ppl) == (9, pytest.approx(1.0), pytest.approx(1.0))  # KL grows with Σ ε


def test_a_reversed_measurement_gives_a_negative_correlation(profile, records):
    predicted = {id(r): p.predicted for r, p in zip(records, predicted_vs_measured(profile, records).points)}
    flipped = [{**r, "kl": 1.0 / predicted[id(r)]} for r in records]
    check = predicted_vs_measured(profile, flipped)
    assert check.correlation(OVERALL).kl == pytest.approx(-1.0)
    assert check.correlation("lems").kl == pytest.approx(-1.0)


def test_results_it_cannot_predict_are_skipped_with_the_reason(profile, records):
    good = records[0]
    ranks = dict(good["ranks"])
    ranks.pop(next(iter(ranks)))
    bad = [{**good, "ranks": None}, {**good, "fingerprint": "other"}, {**good, "decomposition": "kfac"},
           {**good, "ranks": ranks}, {**good, "method": "x", "kl": None}]
    check = predicted_vs_measured(profile, bad)
    reasons = [s.reason for s in check.skipped]
    assert len(reasons) == 4
    assert "no ranks" in reasons[0] and "another model" in reasons[1] and "'kfac'" in reasons[2]
    assert "other layers" in reasons[3]
    assert [p.method for p in check.points] == ["x"] and check.points[0].kl is None  # kept, without a KL
    assert check.correlation(OVERALL).n_kl == 0 and check.correlation(OVERALL).kl is None


def test_layer_fits_residuals_in_decades(profile):
    p = synthetic_profile()
    name, i = p.layers[3].name, 3
    params = ErrorModelParams(ref_ratio=p.ref_ratio)
    fitted_at_half = fitted_curve(p, name, [0.5], params)[0]
    measured = np.array([fitted_curve(p, l.name, [0.5], params)[0] for l in p.layers])
    measured[i] = 10 * fitted_at_half
    p.measured = {0.5: measured}
    p.kl_floor = {"kl": float(p.kl_ref[i])}  # the reference point of layer i is then "near the floor"
    fit = layer_fits(p, [name], params)[0]
    assert list(fit.ratios) == [p.ref_ratio, 0.5]
    assert fit.residuals == pytest.approx([0.0, 1.0])  # exact at the reference; at 0.5 the model is a decade low
    assert fit.rms == pytest.approx(1.0)
    assert list(fit.near_floor) == [True, bool(10 * fitted_at_half < 3 * p.kl_ref[i])]
    layer = p.layers[i]
    rank = int(0.5 * layer.eq_rank)
    assert fitted_at_half == pytest.approx(p.kl_ref[i] * spectral_shape(p.spectra[name], np.array([rank]),
                                                                          layer.eq_rank, params)[0])
    others = layer_fits(p, params=params)
    assert len(others) == len(p.layers) and max(abs(f.residuals).max() for f in others if f.name != name) < 1e-9


def test_one_fixture_record_is_an_eval_result(profile):
    from lems_core.pipeline import EvalResult

    record = fixture_record(profile, "lems", 0.8)
    assert set(record) == set(EvalResult.__dataclass_fields__)
    assert record["ranks"] and record["settings"]["protocol"]["name"] == "quick"


def test_a_rank_at_or_above_break_even_in_a_record_counts_as_forced_factorised(profile, records):
    from lems_core.budget import force_factorised, is_force_factorised
    from lems_core.prediction_check import record_ranks

    layer = profile.layers[0]
    ranks = dict(records[0]["ranks"])
    ranks[layer.name] = layer.eq_rank  # JSON keeps a forced rank as a plain int
    restored = record_ranks(profile, {"ranks": ranks})
    assert is_force_factorised(restored[layer.name]) and not is_force_factorised(restored[profile.layers[1].name] or 0)
    params, _ = profile_error_model(profile, records[0]["budget"])
    expected = sum(predicted_errors(profile, {**ranks, layer.name: force_factorised(layer.eq_rank)}, params).values())
    point = predicted_vs_measured(profile, [{**records[0], "ranks": ranks}]).points[0]
    assert point.predicted == pytest.approx(expected)
    assert point.predicted > sum(predicted_errors(profile, {**ranks, layer.name: None}, params).values())
