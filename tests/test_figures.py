"""The app's tables and figures (app_pages/tables.py, app_pages/figures.py) and the plan/cache helpers they use."""
import os
import time

import numpy as np
import pytest

from app_pages import figures, tables
from lems_core.allocators import allocate, params_of, predicted_errors, realised_ratio
from lems_core.cache import folder_size, plans_dir, saved_plans
from lems_core.error_model import ErrorModelParams
from lems_core.model import KINDS
from lems_core.plan import parse_budgets, plan_file_name, unique_plans
from lems_core.profile import synthetic_profile

PARAMS = ErrorModelParams()


@pytest.fixture(scope="module")
def profile():
    p = synthetic_profile(num_blocks=4)
    p.measured = {0.3: np.asarray(p.kl_ref) * 0.2}
    return p


@pytest.fixture(scope="module")
def allocations(profile):
    return {m: allocate(profile, m, 0.7, params=PARAMS) for m in ("lems", "uniform", "mrcs")}


def test_summary_and_layer_tables(profile):
    summary = tables.profile_summary(profile)
    assert summary["Blocks"] == 4 and summary["Compressible layers"] == 28
    assert summary["Extra measured ratios"] == "0.3" and summary["Scale measured"] == "yes"
    table = tables.layer_table(profile)
    assert len(table) == 28 and list(table["kind"][:7]) == list(KINDS)
    assert table["params"].sum() == profile.total_params
    assert np.allclose(table["KL scale"], profile.kl_ref)
    kinds = tables.kind_table(profile)
    assert list(kinds["kind"]) == list(KINDS) and kinds["share of params"].sum() == pytest.approx(1.0)


def test_select_layers_and_default_blocks(profile):
    names = tables.select_layers(profile, [0, 3], ["q", "down"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    assert len(tables.select_layers(profile)) == 28
    assert tables.select_layers(profile, [], None) == []
    assert tables.default_blocks(30) == [0, 15, 29] and tables.default_blocks(1) == [0]


def test_spectra_figures_one_line_per_layer_legend_names_kind_and_block(profile):
    names = tables.select_layers(profile, [0, 1], ["q", "k"])
    fig = figures.spectra_figure(profile, names)
    assert len(fig.data) == 4
    assert [t.name for t in fig.data] == ["q · block 0", "k · block 0", "q · block 1", "k · block 1"]
    assert {t.legendgroup for t in fig.data} == {"q", "k"}
    assert {t.line.dash for t in fig.data} == {"solid", "dash"}
    assert fig.layout.yaxis.type == "log"
    resid = figures.residual_energy_figure(profile, names, power=2, ref_ratio=0.1)
    (line,) = resid.layout.shapes  # the reference line has an explicit mid-grey colour (visible in dark mode)
    assert line.line.color == figures.REFERENCE_LINE
    y = np.asarray(resid.data[0].y)
    assert y[0] == pytest.approx(1.0) and np.all(np.diff(y) <= 1e-15)
    assert max(resid.data[0].x) == pytest.approx(1.0)  # up to the break-even rank


def test_energy_kept_grid_is_block_by_kind_and_grows_with_ratio(profile):
    low, high = tables.energy_kept_grid(profile, 0.1), tables.energy_kept_grid(profile, 0.5)
    assert low.shape == (4, 7) and list(low.columns) == list(KINDS) and list(low.index) == [0, 1, 2, 3]
    assert ((low >= 0) & (low <= 1)).all().all()
    assert (high.to_numpy() >= low.to_numpy()).all()
    power1 = tables.energy_kept_grid(profile, 0.1, power=1)
    assert not np.allclose(power1.to_numpy(), low.to_numpy())


def test_kl_scale_and_error_curves(profile):
    bars = figures.kl_scale_figure(profile)
    assert sum(len(t.x) for t in bars.data) == 28 and {t.name for t in bars.data} == set(KINDS)
    names = tables.select_layers(profile, [0], ["q"])
    fig = figures.error_curves_figure(profile, names, PARAMS)
    line, markers, _legend_key = fig.data
    assert list(markers.x) == [0.1, 0.3]
    assert list(markers.y) == pytest.approx([profile.kl_ref[0], profile.measured[0.3][0]])
    # the fitted line is the measured scale times a shape that is 1 at the reference ratio
    assert np.all(np.asarray(line.y)[np.asarray(line.x) < 0.1] >= profile.kl_ref[0] - 1e-12)
    assert tables.measured_ratios(profile) == [0.1, 0.3]


def test_depth_bias_figure_runs_from_one_plus_gamma_to_one(profile):
    fig = figures.depth_bias_figure(4, ErrorModelParams(gamma=3.0))
    assert list(fig.data[0].y) == pytest.approx([4.0, 3.0, 2.0, 1.0])
    flat = figures.depth_bias_figure(4, ErrorModelParams(bias_form="constant"))
    assert list(flat.data[0].y) == [1.0] * 4


def test_error_model_summary_names_the_three_terms():
    text = tables.error_model_summary(PARAMS)
    assert "energy power 2" in text and "ratio 0.1" in text and "measured KL" in text and "γ=5" in text
    off = tables.error_model_summary(ErrorModelParams(use_scale=False, bias_form="constant"), has_scale=False)
    assert "scale: off (no KL measured" in off and "bias: off" in off


def test_kept_fraction_and_ranks_frame(profile, allocations):
    layer = profile.layers[0]  # 64 x 64, eq rank 32
    assert tables.kept_fraction(layer, None) == 1.0
    assert tables.kept_fraction(layer, 8) == pytest.approx(8 * 128 / 4096)
    assert tables.kept_fraction(layer, layer.eq_rank) == 1.0  # break-even counts as dense
    ranks = allocations["lems"].ranks
    frame = tables.ranks_frame(profile, ranks, predicted_errors(profile, ranks, PARAMS))
    assert frame["params"].sum() == params_of(profile, ranks)
    assert frame["dense"].sum() == sum(r is None for r in ranks.values())
    assert frame["predicted error"].sum() == pytest.approx(allocations["lems"].objective)
    assert "predicted error" not in tables.ranks_frame(profile, ranks)


def test_grids_and_difference(profile, allocations):
    lems, uniform = allocations["lems"].ranks, allocations["uniform"].ranks
    grid = tables.kept_fraction_grid(profile, lems)
    assert grid.shape == (4, 7) and ((grid > 0) & (grid <= 1)).all().all()
    labels = tables.rank_grid(profile, lems)
    dense = [(l.block, l.kind) for l in profile.layers if lems[l.name] is None]
    assert all(labels.loc[b, k] == "D" for b, k in dense)
    assert (tables.difference_grid(profile, lems, lems) == 0).all().all()
    diff = tables.difference_grid(profile, lems, uniform)
    assert np.allclose(diff.to_numpy(), grid.to_numpy() - tables.kept_fraction_grid(profile, uniform).to_numpy())


def test_heatmap_figure_ranges_and_labels(profile, allocations):
    diff = tables.difference_grid(profile, allocations["lems"].ranks, allocations["uniform"].ranks)
    fig = figures.heatmap_figure(diff, "d", "Δ", diverging=True)
    heat = fig.data[0]
    assert heat.zmin == -heat.zmax and heat.zmax == pytest.approx(np.abs(diff.to_numpy()).max())
    values = fig.data[1]  # 4 blocks: every cell labelled with its value, by a text trace over the heatmap
    assert values.mode == "text" and len(values.text) == diff.size
    assert values.text[0] == f"{diff.to_numpy()[0, 0]:.2f}"
    text = tables.rank_grid(profile, allocations["lems"].ranks)
    labelled = figures.heatmap_figure(tables.kept_fraction_grid(profile, allocations["lems"].ranks), "k", "kept",
                                      text=text, zrange=(0.0, 1.0))
    assert list(labelled.data[1].text) == list(text.to_numpy().ravel()) and labelled.data[0].zmax == 1.0
    zeros = figures.heatmap_figure(diff * 0, "zero", "Δ", diverging=True)
    assert zeros.data[0].zmax == 1.0  # no division by zero on an all-zero difference


def test_comparison_table_scores_every_method_under_one_model(profile, allocations):
    ranks = {k: a.ranks for k, a in allocations.items()}
    errors = tables.predicted_error_tables(profile, ranks, PARAMS)
    assert errors["lems"] == pytest.approx(predicted_errors(profile, ranks["lems"], PARAMS))
    table = tables.comparison_table(profile, allocations, errors).set_index("method")
    assert list(table.index) == ["LEMS", "Uniform", "MRCS"]
    for key, label in (("lems", "LEMS"), ("uniform", "Uniform"), ("mrcs", "MRCS")):
        assert table.loc[label, "realised ratio"] == pytest.approx(realised_ratio(profile, allocations[key].ranks))
        assert table.loc[label, "realised ratio"] <= 0.7 + 1e-9
    assert table.loc["LEMS", "predicted error"] == pytest.approx(allocations["lems"].objective)
    assert table.loc["LEMS", "predicted error"] <= table["predicted error"].min() + 1e-12
    per_block = figures.error_by_block_figure(profile, errors)
    assert len(per_block.data[0].y) == 4 and per_block.layout.yaxis.type == "log"
    assert np.nansum(per_block.data[0].y) == pytest.approx(table.loc["LEMS", "predicted error"])
    assert np.isnan(table.loc["Uniform", "objective"])  # no objective of its own: empty, not "None"
    lines = figures.per_block_figure(profile, ranks)
    assert [t.name for t in sorted(lines.data, key=lambda t: t.legendrank)] == ["LEMS", "Uniform", "MRCS"]
    assert lines.data[-1].name == "Uniform"  # drawn last: on top of the lines it coincides with
    assert all(len(t.x) == profile.num_blocks for t in lines.data)  # one point per block, not per layer
    kept = np.asarray(lines.data[-1].y)
    by_block = tables.ranks_frame(profile, ranks["uniform"]).groupby("block")["params"].sum().to_numpy()
    dense = np.array([sum(l.params for l in profile.layers if l.block == b) for b in range(4)])
    assert kept == pytest.approx(by_block / dense)


def test_per_block_figure_stays_small_on_a_real_sized_model():
    big = synthetic_profile(num_blocks=30)
    ranks = {m: allocate(big, m, 0.7, params=PARAMS).ranks for m in ("lems", "uniform", "svdllm_v2", "mrcs")}
    fig = figures.per_block_figure(big, ranks)
    assert sum(len(t.x) for t in fig.data) == 4 * 30  # was 4 x 210 bars
    errors = tables.predicted_error_tables(big, ranks, PARAMS)
    assert figures.error_by_block_figure(big, errors).layout.yaxis.type == "log"
    grid = tables.kept_fraction_grid(big, ranks["lems"])
    heat = figures.heatmap_figure(grid, "k", "kept", text=tables.rank_grid(big, ranks["lems"]), zrange=(0, 1))
    # 30 blocks: cells too small for a readable label, so the hover has them (the caption says so)
    assert not figures.heatmap_labelled(30) and len(heat.data) == 1 and heat.data[0].texttemplate is None
    assert figures.heatmap_labelled(16) and not figures.heatmap_labelled(80)


def test_comparison_table_reports_served_plans_without_a_solve_time(profile):
    from lems_core.allocators import Allocation

    uniform = allocate(profile, "uniform", 0.7)
    served = Allocation("ars", 0.7, uniform.ranks, solve_seconds=297.93, info={"plan_created": "x", "seconds": 297.93})
    errors = tables.predicted_error_tables(profile, {"ars": served.ranks, "uniform": uniform.ranks}, PARAMS)
    table = tables.comparison_table(profile, {"ars": served, "uniform": uniform}, errors,
                                    labels={"ars": "ARS (trained)"}).set_index("method")
    assert np.isnan(table.loc["ARS (trained)", "solve ms"]) and table.loc["ARS (trained)", "trained s"] == 297.93
    assert "trained s" not in tables.comparison_table(profile, {"uniform": uniform}, errors)


def test_failure_messages_lose_the_method_prefix():
    from lems_core.allocators import BudgetBelowMinimumError

    exc = BudgetBelowMinimumError("lems", 0.1, 0.2, 100, "why")
    assert tables.failure_message("lems", exc).startswith("budget ratio 0.1 is below")
    assert tables.failure_message("uniform", ValueError("other")) == "other"


def test_model_card_names_the_demo_and_reads_shapes():
    profile = synthetic_profile(num_blocks=3)
    card = tables.model_card(profile)
    assert card["Hidden size"] == 64 and card["MLP width"] == 160 and card["KV width (k/v out)"] == 32
    assert card["Decoder blocks"] == 3 and card["Compressible Linears"] == 21
    profile.model_source = "demo"
    card = tables.model_card(profile)
    assert card["Model"] == "SmolLM2-135M-Instruct (demo)" and card["Licence"] == "Apache-2.0"
    assert tables.profile_summary(profile)["Model"] == "SmolLM2-135M-Instruct (demo)"


RECORDS = [
    {"method": "lems", "decomposition": "kfac", "budget": 0.8, "realised_ratio": 0.79, "ppl": {"wikitext2": 20.0},
     "dense_ppl": {"wikitext2": 15.0}, "kl": 0.1, "fingerprint": "f", "settings": {"seq_len": 512}},
    {"method": "uniform", "decomposition": "kfac", "budget": 0.8, "realised_ratio": 0.78,
     "ppl": {"wikitext2": 30.0, "ptb": 50.0}, "dense_ppl": {"wikitext2": 15.0}, "kl": 0.3, "fingerprint": "f"},
    {"method": "lems", "decomposition": "kfac", "budget": 0.6, "realised_ratio": 0.6, "ppl": {"wikitext2": 40.0},
     "dense_ppl": {"wikitext2": 15.0}, "kl": 0.5, "fingerprint": "f"},
]


def test_results_frame_and_ppl_plot():
    frame = tables.results_frame(RECORDS)
    assert list(frame["method"]) == ["LEMS", "Uniform", "LEMS"]
    assert frame.loc[1, "ppl ptb"] == 50.0 and np.isnan(frame.loc[0, "ppl ptb"])
    assert "settings" not in frame and frame.loc[0, "dense ppl wikitext2"] == 15.0
    assert tables.ppl_datasets(frame) == ["wikitext2", "ptb"]
    assert list(frame["seq len"][:1]) == [512] and frame.loc[0, "windows"] == "all"
    same_protocol = frame.assign(protocol="reference")
    fig = figures.ppl_vs_ratio_figure(same_protocol, "wikitext2")
    lems = next(t for t in fig.data if t.name == "LEMS")
    assert list(lems.x) == [0.6, 0.79] and list(lems.y) == [40.0, 20.0]  # sorted by ratio
    assert fig.layout.shapes and fig.layout.shapes[0].y0 == 15.0  # dense reference line
    assert fig.layout.shapes[0].line.color == figures.REFERENCE_LINE
    mixed = figures.ppl_vs_ratio_figure(frame, "wikitext2")  # protocols differ: never one line across them
    assert sorted(len(t.x) for t in mixed.data if t.name.startswith("LEMS")) == [1, 1]
    only_ptb = figures.ppl_vs_ratio_figure(frame, "ptb")
    assert sum(len(t.x) for t in only_ptb.data) == 1
    assert len(figures.ppl_vs_ratio_figure(frame, "c4").data) == 0


def test_ppl_plot_axes_fit_the_data_and_diverged_runs_stay_on_the_edge():
    records = [dict(r, settings={"seq_len": 2048, "max_windows": 8}) for r in RECORDS]
    records.append(dict(RECORDS[0], budget=0.3, realised_ratio=0.3, ppl={"wikitext2": 1e35},
                        settings={"seq_len": 2048, "max_windows": 8}))
    records.append(dict(RECORDS[0], realised_ratio=float("nan"), ppl={"wikitext2": float("inf")}))
    frame = tables.results_frame(records)
    assert set(frame.loc[:3, "windows"]) == {"8"} and set(frame.loc[:3, "seq len"]) == {2048}
    fig = figures.ppl_vs_ratio_figure(frame, "wikitext2")
    lo, hi = fig.layout.yaxis.range
    assert fig.layout.yaxis.type == "log" and 0 < lo < np.log10(15.0) and hi <= np.log10(figures.PPL_CEILING) + 0.2
    x0, x1 = fig.layout.xaxis.range
    assert 0.0 <= x0 <= 0.3 and 0.79 <= x1 <= 1.05
    ys = np.concatenate([np.asarray(t.y, dtype=float) for t in fig.data])
    assert ys.max() <= 10 ** hi and len(ys) == 4  # the diverged run is drawn (at the edge); the inf one is not
    assert "diverged" in fig.layout.title.subtitle.text


def test_unique_plans_drops_repeats(profile, allocations):
    lems = allocations["lems"].to_plan(profile)
    again = allocate(profile, "lems", 0.7, params=PARAMS).to_plan(profile, meta={"note": "same ranks"})
    uniform = allocations["uniform"].to_plan(profile)
    kept = unique_plans({"a": lems, "b": again, "c": uniform})
    assert list(kept) == ["a", "c"]


def test_parse_budgets():
    assert parse_budgets("0.8, 0.6 0.7;0.6") == [0.6, 0.7, 0.8]
    assert parse_budgets("  ") == []
    assert parse_budgets("1") == [1.0]
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_budgets("0.5, abc")
    with pytest.raises(ValueError, match="not a kept fraction"):
        parse_budgets("0.5, 1.5")
    with pytest.raises(ValueError, match="not a kept fraction"):
        parse_budgets("0")


def test_plan_files_and_cache_summary(tmp_path):
    assert saved_plans(tmp_path) == []
    name = plan_file_name("lems", 0.8, "abcdef0123456789")
    assert name == "lems_r0.800_abcdef01.json"
    assert plan_file_name("a b/c", 0.5, "x") == "a-b-c_r0.500_x.json"
    folder = plans_dir(tmp_path)
    folder.mkdir()
    old, new = folder / "old.json", folder / "new.json"
    old.write_text("{}")
    new.write_text("{}" * 10)
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert saved_plans(tmp_path) == [new, old]
    summary = tables.cache_summary(tmp_path)
    assert summary == {"profiles": 0, "saved plans": 2, "size": "22 B"}
    assert folder_size(tmp_path / "missing") == 0


def test_human_units():
    assert tables.human_count(172032) == "172k" and tables.human_count(1.35e8) == "135M"
    assert tables.human_count(12) == "12"
    assert tables.human_bytes(1536) == "1.5 KB" and tables.human_bytes(3 * 1024**4) == "3.07e+03 GB"
    assert tables.method_label("svdllm_v2") == "SVD-LLM V2" and tables.method_label("new") == "new"


def test_labels_of_seed_methods_and_decompositions():
    assert tables.method_label("erc_plc") == "ERC-SVD (PLC)" and tables.method_label("lcsvd_search") == "LC-SVD search"
    assert tables.decomposition_label(tables.PLAN_DECOMPOSITION) == "plan's own decomposition"
    assert tables.decomposition_label("svd_llm") == "SVD-LLM (svd_llm)"
    assert tables.decomposition_label("saes", ["saes", "erc"]) == "SAES-SVD (saes), per plan (slower)"
    assert tables.decomposition_label("new") == "new"


def test_unique_plans_keeps_plan_requests_once():
    from lems_core.pipeline import PlanRequest

    profile = synthetic_profile(num_blocks=2)
    plan = allocate(profile, "uniform", 0.7).to_plan(profile)
    kept = unique_plans({"a": plan, "b": PlanRequest("atp", 0.7), "c": PlanRequest("atp", 0.7),
                         "d": PlanRequest("atp", 0.8), "e": plan})
    assert list(kept) == ["a", "b", "d"]


def test_results_frame_marks_the_protocol_and_splits():
    from lems_core.evaluation import QUICK_EVAL, REFERENCE_EVAL

    records = [
        {"method": "lems", "ppl": {"ptb": 30.0}, "settings": {"protocol": REFERENCE_EVAL.to_dict(),
                                                               "splits": {"ptb": "validation"}}},
        {"method": "lems", "ppl": {"wikitext2": 20.0}, "settings": {"protocol": QUICK_EVAL.to_dict()}},
        {"method": "uniform", "ppl": {"wikitext2": 25.0}, "settings": {"seq_len": 512, "max_windows": 16}},
    ]
    frame = tables.results_frame(records)
    assert list(frame["protocol"]) == ["reference", "quick", "quick-16"]
    assert frame["splits"][0] == "ptb:validation"


def test_kl_floor_caption_reports_the_floor_and_the_layers_near_it():
    import numpy as np

    from lems_core.profile import synthetic_profile

    profile = synthetic_profile(num_blocks=2)
    assert "not measured" in tables.kl_floor_caption(profile)
    profile.kl_floor = {"kl": float(np.sort(profile.kl_ref)[2]) / 3 + 1e-12, "reference_precision": "bf16",
                        "kl_fp32": 0.0}
    text = tables.kl_floor_caption(profile)
    assert "bf16" in text and "float32 reference: 0" in text and f"3 of {len(profile.layers)} layers" in text


def test_fast_figures_are_valid_plotly_specs(profile, allocations):
    """The figures built without validation (figures._figure) must pass Plotly's validation."""
    import plotly.graph_objects as go

    ranks = {k: a.ranks for k, a in allocations.items()}
    errors = tables.predicted_error_tables(profile, ranks, PARAMS)
    built = [figures.heatmap_figure(tables.kept_fraction_grid(profile, ranks["lems"]), "k", "kept",
                                    text=tables.rank_grid(profile, ranks["lems"]), zrange=(0.0, 1.0)),
             figures.heatmap_figure(tables.difference_grid(profile, ranks["lems"], ranks["uniform"]), "d", "Δ",
                                    diverging=True),
             figures.per_block_figure(profile, ranks), figures.error_by_block_figure(profile, errors),
             figures.block_views_figure(profile, ranks, errors), figures.rank_heatmaps_figure(profile, ranks),
             figures.rank_heatmaps_figure(synthetic_profile(num_blocks=20), {"a": {}, "b": {}, "c": {}, "d": {},
                                                                            "e": {}, "f": {}})]
    for fig in built:
        go.Figure(fig.to_dict())  # raises ValueError on any invalid property


def test_the_block_views_share_one_legend_over_two_panels(profile, allocations):
    ranks = {k: a.ranks for k, a in allocations.items()}
    errors = tables.predicted_error_tables(profile, ranks, PARAMS)
    fig = figures.block_views_figure(profile, ranks, errors)
    kept = figures.per_block_figure(profile, ranks)
    error = figures.error_by_block_figure(profile, errors)
    left, right = fig.data[:len(kept.data)], fig.data[len(kept.data):]
    assert [t.y.tolist() for t in left] == [t.y.tolist() for t in kept.data]
    for drawn, alone in zip(right, error.data, strict=True):
        assert np.asarray(drawn.y, dtype=float) == pytest.approx(np.asarray(alone.y, dtype=float), nan_ok=True)
    assert {t.xaxis for t in right} == {"x2"} and fig.layout.yaxis2.type == "log"
    assert [t.name for t in fig.data if t.showlegend is not False] == [t.name for t in kept.data]  # one entry each
    assert {t.legendgroup for t in right} == {t.legendgroup for t in left}  # a click hides a method in both panels


def test_budget_sweep_predicts_lems_best_and_overlays_measured_kl(profile):
    sweep = tables.sweep_frame(profile, ["lems", "uniform", "mrcs"], PARAMS, budgets=(0.4, 0.6, 0.8))
    lems = sweep[sweep["method"] == "LEMS"].set_index("budget")["predicted error"]
    assert list(lems.index) == [0.4, 0.6, 0.8] and lems.is_monotonic_decreasing
    for method in ("Uniform", "MRCS"):
        other = sweep[sweep["method"] == method].set_index("budget")["predicted error"]
        assert (lems.loc[other.index] <= other + 1e-12).all()  # LEMS is optimal for its own objective
    records = [dict(r, settings={"seq_len": 2048}) for r in RECORDS] + [dict(RECORDS[0], fingerprint="other")]
    measured = tables.measured_points(records, "f")
    assert len(measured) == 3
    fig = figures.budget_sweep_figure(sweep, measured)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert sum(t.yaxis == "y2" for t in fig.data) == 2  # LEMS and Uniform measured points
    assert len(figures.budget_sweep_figure(sweep, measured.iloc[:0]).data) == 3


# ------------------------------------------------------------ predicted vs measured, shipped (#13)
@pytest.fixture(scope="module")
def check_records(profile):
    from shipped_fixture import fixture_records

    records = fixture_records(profile, methods=("lems", "uniform"), budgets=(0.6, 0.7, 0.8))
    return [{**r, "source": "shipped"} for r in records] + [{**records[0], "ranks": None, "source": "cache"}]


def test_prediction_tables_and_scatter(profile, check_records):
    from lems_core.prediction_check import predicted_vs_measured

    check = predicted_vs_measured(profile, check_records)
    frame, rho = tables.prediction_frame(check), tables.correlation_frame(check)
    assert len(frame) == 6 and set(frame["method"]) == {"LEMS", "Uniform"} and set(frame["source"]) == {"shipped"}
    assert list(rho["allocator"]) == ["LEMS", "Uniform", "all results"]
    assert rho["ρ predicted vs KL"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert tables.skipped_frame(check)["reason"].str.contains("no ranks").tolist() == [True]
    fig = figures.prediction_scatter_figure(frame, "KL", rho)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert [t.name for t in fig.data] == ["LEMS · ρ=1.00", "Uniform · ρ=1.00"]
    assert fig.data[0].marker.color == figures.METHOD_COLORS["lems"]
    assert "over all 6 results: 1.00" in fig.layout.title.subtitle.text
    few = figures.prediction_scatter_figure(frame.iloc[:2], "ppl wikitext2", None)
    assert "too few" in few.layout.title.subtitle.text
    empty = figures.prediction_scatter_figure(frame.iloc[0:0], "KL", rho)
    assert empty.layout.title.text.startswith("No results with ranks")


def test_layer_fit_figure_and_residual_table(profile):
    from lems_core.prediction_check import layer_fits

    names = tables.select_layers(profile, [0, 3], ["q"])
    fits = layer_fits(profile, names, PARAMS)
    fig = figures.layer_fit_figure(profile, fits, PARAMS)
    keys = [t for t in fig.data if t.hoverinfo == "skip"]  # legend-only entries of the crosses
    assert len(fig.data) == 3 * len(names) + len(keys)  # curve, measured points, residuals per layer
    assert keys[0].name == "measured KL (×)" and keys[0].marker.symbol == "x" and keys[0].showlegend is not False
    assert keys[0].marker.color == figures.REFERENCE_LINE
    assert (len(keys) == 2) == any(f.near_floor.any() for f in fits)
    residuals = [t for t in fig.data if t.yaxis == "y2"]
    assert len(residuals) == len(names) and list(residuals[0].y) == pytest.approx(list(fits[0].residuals))
    assert fig.layout.yaxis.type == "log"
    table = tables.layer_fit_frame(layer_fits(profile, params=PARAMS))
    assert len(table) == len(profile.layers) and table["points"].eq(2).all()
    assert table["RMS residual (decades)"].is_monotonic_decreasing  # worst first
    worst = table.iloc[0]
    assert worst["at ratio"] == pytest.approx(0.3) and abs(worst["worst residual"]) == pytest.approx(
        worst["RMS residual (decades)"])


def test_measured_at_budget_sits_next_to_the_live_prediction(profile, check_records):
    here = tables.measured_at_budget(check_records, profile, 0.8, PARAMS)
    assert sorted(here["method"]) == ["LEMS", "Uniform"] and set(here["protocol"]) == {"quick"}
    lems_ranks = allocate(profile, "lems", 0.8).ranks
    expected = sum(predicted_errors(profile, lems_ranks, PARAMS).values())
    assert here.set_index("method").loc["LEMS", "predicted Σ ε"] == pytest.approx(expected)
    at_six = tables.measured_at_budget(check_records, profile, 0.6, PARAMS)
    assert len(at_six) == 3 and at_six["predicted Σ ε"].isna().sum() == 1  # the record without ranks
    assert tables.measured_at_budget(check_records, profile, 0.75).empty
    assert "predicted Σ ε" not in tables.measured_at_budget(check_records, profile, 0.8).columns
    assert tables.measured_budgets(check_records, profile.fingerprint) == [0.6, 0.7, 0.8]
    assert tables.measured_budgets(check_records, "another") == []
    assert set(tables.results_frame(check_records)["source"]) == {"shipped", "yours"}


# ------------------------------------------------------------ one look per method, readable figures
def _lab(color: str) -> np.ndarray:
    """CIELAB of "#rrggbb" (D65), for colour distances."""
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
    f = np.cbrt(np.maximum(xyz / np.array([0.95047, 1.0, 1.08883]), 0.008856))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_every_allocator_has_its_own_name_colour_and_marker():
    from itertools import combinations

    from app_pages import style
    from lems_core.allocators import ALLOCATORS

    shown = [*ALLOCATORS, "lems_fit", "uploaded"]  # lems_fit: a method of the shipped study
    styles = {m: style.method_style(m) for m in shown}
    assert all(m in style.METHOD_STYLES for m in shown), "an allocator without a style of its own"
    looks = [*styles.values(), style.DENSE]
    assert len({s.name for s in looks}) == len(looks) and len({s.marker for s in looks}) == len(looks)
    for (a, sa), (b, sb) in combinations([*styles.items(), ("dense", style.DENSE)], 2):
        distance = np.linalg.norm(_lab(sa.color) - _lab(sb.color))
        assert distance > 15, f"{a} and {b} look alike ({sa.color} vs {sb.color}, ΔE {distance:.0f})"
    assert style.display_name("lems_fit") == "LEMS (bias fitted on the model)"
    assert style.display_name("mrcs_dense") == "MRCS (untouched dense)" and style.method_key("SVD-LLM V2") == "svdllm_v2"
    assert style.method_style("LEMS (fixed bias)") == style.METHOD_STYLES["lems_fixed"]


def test_messages_name_methods_by_display_name():
    from app_pages import style
    from lems_core.allocators import allocate
    from lems_core.constraints import ConstraintError, LayerConstraints

    profile = synthetic_profile(num_blocks=2)
    with pytest.raises(ConstraintError) as refused:
        allocate(profile, "ars", 0.7, constraints=LayerConstraints(lock_dense=("block:0",)))
    text = tables.failure_message("ars", refused.value)
    assert "LEMS (fixed bias)" in text and "MRCS (untouched dense)" in text
    assert "lems_fixed" not in text and "mrcs_dense" not in text
    assert style.display_names_in("see lems_core/cache and lems.json; uniform.") == \
        "see lems_core/cache and lems.json; Uniform."


def test_figures_use_the_method_styles_and_display_names(profile, allocations):
    from app_pages import style

    ranks = {k: a.ranks for k, a in allocations.items()}
    fig = figures.per_block_figure(profile, ranks)
    for trace in fig.data:
        look = style.method_style(trace.name)
        assert trace.line.color == look.color and trace.marker.symbol == look.marker
    assert {t.name for t in fig.data} == {"LEMS", "Uniform", "MRCS"}
    frame = tables.results_frame([dict(RECORDS[0], method="lems_fit"), dict(RECORDS[1], method="mrcs_dense")])
    ppl = figures.ppl_vs_ratio_figure(frame.assign(protocol="reference"), "wikitext2")
    names = {t.name for t in ppl.data}
    assert names == {"LEMS (bias fitted on the model)", "MRCS (untouched dense)"}
    assert {t.line.color for t in ppl.data} == {style.METHOD_STYLES["lems_fit"].color,
                                              style.METHOD_STYLES["mrcs_dense"].color}


def _log_axes(fig) -> list:
    layout = fig.layout
    return [layout[name] for name in layout if name.startswith(("xaxis", "yaxis")) and layout[name].type == "log"]


def test_log_axes_use_powers_of_ten_not_si_prefixes(profile, allocations):
    names = tables.select_layers(profile, [0, 3], ["q", "down"])
    ranks = {k: a.ranks for k, a in allocations.items()}
    sweep = tables.sweep_frame(profile, ["lems", "uniform"], PARAMS, budgets=(0.4, 0.8))
    built = [figures.spectra_figure(profile, names), figures.residual_energy_figure(profile, names),
             figures.kl_scale_figure(profile), figures.error_curves_figure(profile, names, PARAMS),
             figures.error_by_block_figure(profile, tables.predicted_error_tables(profile, ranks, PARAMS)),
             figures.budget_sweep_figure(sweep, tables.measured_points(RECORDS, "f"))]
    for fig in built:
        axes = _log_axes(fig)
        assert axes, fig.layout.title.text
        for axis in axes:  # "10μ" on a unitless ratio came from Plotly's default SI format
            assert axis.exponentformat == "power", fig.layout.title.text
    resid = figures.residual_energy_figure(profile, names)
    axis = resid.layout.yaxis  # labels chosen here (1-2-5 or whole decades), not Plotly's piled-up 2s and 5s
    assert axis.dtick is not None or axis.tickmode == "array"


def test_legends_stay_clear_of_the_axis_titles(profile, allocations):
    ranks = {k: a.ranks for k, a in allocations.items()}
    names = tables.select_layers(profile, [0, 1, 2], list(KINDS))  # 21 layers, the Spectra default's size
    frame = tables.results_frame(RECORDS)
    built = [figures.spectra_figure(profile, names), figures.per_block_figure(profile, ranks),
             figures.ppl_vs_ratio_figure(frame, "wikitext2")]
    for fig in built:  # outside the plot on the right, where no axis title is
        assert fig.layout.legend.x >= 1.0 and fig.layout.legend.xanchor == "left"
    spectra = built[0]
    assert spectra.layout.height >= 130 + 22 * len(names)  # the legend fits: no entry cut or scrolled away
    sweep = tables.sweep_frame(profile, ["lems", "uniform"], PARAMS, budgets=(0.4, 0.8))
    fig = figures.budget_sweep_figure(sweep, tables.measured_points(RECORDS, "f"))
    assert fig.layout.yaxis2.side == "right"  # a right axis: the legend sits beyond its title
    legend = fig.layout.legend
    assert legend.xref == "container" and legend.x == 1 and legend.xanchor == "right"
    longest = max(len(t.name) for t in fig.data)
    assert fig.layout.margin.r >= 60 + 7 * longest


def test_sensitivity_crosses_and_the_dense_line_are_labelled(profile):
    names = tables.select_layers(profile, [0, 1], ["q", "k"])
    fig = figures.error_curves_figure(profile, names, PARAMS)
    points = [t for t in fig.data if t.mode == "markers" and t.showlegend is False]
    keys = [t for t in fig.data if t.mode == "markers" and t.showlegend is not False]
    assert len(points) == 1 and len(points[0].x) == 2 * len(names)
    assert len(set(points[0].marker.color)) > 1  # coloured by kind ...
    (key,) = keys  # ... so the legend entry is a neutral one of the same group, not the first point's kind colour
    assert key.name == "measured KL (×)" and key.marker.color == figures.REFERENCE_LINE and key.marker.symbol == "x"
    assert key.legendgroup == points[0].legendgroup
    ppl = figures.ppl_vs_ratio_figure(tables.results_frame(RECORDS), "wikitext2")
    (label,) = ppl.layout.annotations
    assert label.text == "dense 15" and label.bgcolor and label.font.color == "#222222"
    assert label.yref == "y" and label.y == pytest.approx(np.log10(15.0))  # log axis: placed in decades
    lo, hi = ppl.layout.yaxis.range
    assert lo <= label.y <= hi


def test_log_ticks_are_one_two_five_over_a_few_decades():
    short = figures.log_axis([0.12, 5.0])  # 1.6 decades: one label per decade would leave one or two
    assert short["tickmode"] == "array" and "0.2" in short["ticktext"] and "5" in short["ticktext"]
    tiny = figures.log_axis([2e-6, 3e-5])
    assert "2×10<sup>−6</sup>" in tiny["ticktext"] and not any("μ" in t for t in tiny["ticktext"])
    assert figures.log_axis([1e-12, 1.0])["dtick"] == 2 and "tickvals" not in figures.log_axis([1e-12, 1.0])


def test_heatmap_labels_are_large_and_contrast_with_their_cell(profile, allocations):
    ranks = {k: a.ranks for k, a in allocations.items()}
    fig = figures.rank_heatmaps_figure(profile, ranks)
    heats = [t for t in fig.data if t.type == "heatmap"]
    labels = [t for t in fig.data if t.type == "scatter"]
    assert len(heats) == len(labels) == 3 and {t.coloraxis for t in heats} == {"coloraxis"}  # one colour bar
    assert [a.text for a in fig.layout.annotations] == ["<b>LEMS</b>", "<b>Uniform</b>", "<b>MRCS</b>"]
    assert all(t.textfont.size >= 11 for t in labels)
    z = np.asarray(heats[0].z, dtype=float).ravel()
    colors = np.asarray(labels[0].textfont.color)
    assert set(colors[z > 0.9]) == {"#111111"}  # dark on Viridis' yellow end
    from plotly.colors import sample_colorscale

    cells = sample_colorscale("Viridis", z.tolist())
    assert list(colors) == [figures.cell_text_color(c) for c in cells]  # each against its own cell's colour
    assert list(labels[0].text) == list(tables.rank_grid(profile, ranks["lems"]).to_numpy().ravel())
    assert figures.cell_text_color("#FDE725") == "#111111" and figures.cell_text_color("rgb(68, 1, 84)") == "#FFFFFF"
    big = synthetic_profile(num_blocks=30)
    large = figures.rank_heatmaps_figure(big, {m: allocate(big, m, 0.7).ranks for m in ("lems", "uniform")})
    assert [t.type for t in large.data] == ["heatmap", "heatmap"]  # no text on 14 px rows: the hover has it


def test_results_tables_lead_with_method_source_protocol_ratio_ppl_kl(profile, check_records):
    frame = tables.results_frame([*RECORDS, {**RECORDS[0], "source": "cache"}, {**RECORDS[1], "source": "shipped"}])
    assert list(frame.columns[:7]) == ["method", "source", "protocol", "realised_ratio", "ppl wikitext2", "ppl ptb",
                                       "kl"]
    assert list(frame["source"][3:]) == ["yours", "shipped"]  # your own runs are marked as such
    here = tables.measured_at_budget(check_records, profile, 0.6, PARAMS)
    assert list(here.columns[:6]) == ["method", "source", "protocol", "realised ratio", "ppl wikitext2", "KL"]
    assert set(here["source"]) == {"shipped", "yours"}
    from lems_core.prediction_check import predicted_vs_measured

    points = tables.prediction_frame(predicted_vs_measured(profile, check_records))
    assert list(points.columns[:6]) == ["method", "source", "protocol", "realised ratio", "ppl wikitext2", "KL"]
