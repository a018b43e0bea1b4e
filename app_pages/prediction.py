"""Predicted vs measured: does the error model order real results as they measure? (lems_core.prediction_check)

Its own page rather than a part of Allocate or Sensitivity: it reads every stored and
shipped result of the model (not one budget, not the profile alone), and keeping it
off Allocate keeps the live slider's rerun cost where it was.
"""
import streamlit as st

from lems_core.evaluation import protocol_name
from lems_core.model import KINDS
from lems_core.prediction_check import layer_fit_params, layer_fits, predicted_vs_measured
from lems_core.results import ResultStore
from app_pages import common, figures, tables
from app_pages.chart_view import show_chart

profile = common.current_profile()
st.title("Predicted vs measured")
st.caption("Does the LEMS error model predict reality? **Whole plans**: the predicted Σ ε_l of each measured "
           "result's ranks under the profile's error model (its depth-bias fit nearest the result's budget, as the "
           "LEMS allocator uses it) against the measured KL and perplexity; Spearman's ρ compares the order only, "
           "since Σ ε is not in KL units. **Per layer**: the fitted single-layer curve against the profile's own "
           "single-layer KL measurements.")


def whole_plans() -> None:
    """Scatter of predicted Σ ε vs measured KL / PPL per allocator, the correlations, the table and the skipped."""
    merged = ResultStore(common.cache_dir()).merged()
    for problem in merged.problems:
        st.error(problem)
    records = [r for r in merged.records if r.get("fingerprint") == profile.fingerprint]
    if not records:
        st.info("No measured results for this model yet: evaluate plans on the Compress & evaluate page "
                "(the demo profiles come with the shipped study).")
        return
    datasets = sorted({d for r in records for d in (r.get("ppl") or {})}) or ["wikitext2"]
    protocols = sorted({protocol_name(r.get("settings")) for r in records})
    left, right = st.columns(2)
    dataset = left.radio("Perplexity on", datasets, horizontal=True,
                         **common.bind("pvm_dataset", datasets[0], allowed=datasets))
    protocol = right.radio("Protocol", protocols, horizontal=True,
                           **common.bind("pvm_protocol", _default_protocol(protocols), allowed=protocols),
                           help="Perplexities of different protocols are not comparable, so one at a time.")
    check = predicted_vs_measured(profile, [r for r in records if protocol_name(r.get("settings")) == protocol],
                                  dataset)
    frame, rho = tables.prediction_frame(check), tables.correlation_frame(check)
    if frame.empty:
        st.info(f"None of this model's {protocol} results can be predicted (see the skipped list below).")
    else:
        kl, ppl = st.columns(2)
        show_chart(figures.prediction_scatter_figure(frame, "KL", rho), "pvm_kl_fig", kl)
        show_chart(figures.prediction_scatter_figure(frame, f"ppl {dataset}", rho), "pvm_ppl_fig", ppl)
        st.dataframe(rho, hide_index=True, key="pvm_correlations",
                     column_config={c: st.column_config.NumberColumn(format="%.3f") for c in rho if c.startswith("ρ")})
        st.caption("ρ needs at least 3 results of an allocator (empty otherwise). ρ near 1: the error model orders "
                   "plans as they measure. Each point's bias (α, γ) is listed in the results table.")
        with st.expander(f"The {len(frame)} results", expanded=False):
            st.dataframe(frame, hide_index=True, key="pvm_points")
    skipped = tables.skipped_frame(predicted_vs_measured(profile, records, dataset))  # whatever their protocol
    if not skipped.empty:
        with st.expander(f"{len(skipped)} result(s) skipped", expanded=False):
            st.dataframe(skipped, hide_index=True, key="pvm_skipped")


def _default_protocol(protocols: list[str]) -> str:
    """The quick protocol when present (the shipped study's), else the first."""
    return "quick" if "quick" in protocols else protocols[0]


def per_layer() -> None:
    """Fitted single-layer curves vs the profile's measured points, residuals, and the worst-fitted layers."""
    ratios = tables.measured_ratios(profile)
    if profile.kl_ref is None:
        st.info("This profile has no single-layer KL measurements: there is nothing to check the curves against.")
        return
    params = layer_fit_params(profile, common.error_model_params(profile))
    fits = layer_fits(profile, params=params)
    st.caption(f"Measured ratios: {', '.join(f'{r:g}' for r in ratios)}; the curve is normalised at "
               f"{profile.ref_ratio:g} (residual 0 there by construction). Energy power {params.energy_power} "
               "(the Allocate page's error-model setting). Hollow points lie under 3x the profile's KL floor.")
    col1, col2 = st.columns(2)
    blocks = col1.multiselect("Blocks", list(range(profile.num_blocks)),
                              **common.bind("pvm_blocks", tables.default_blocks(profile.num_blocks),
                                            allowed=range(profile.num_blocks)))
    kinds = col2.multiselect("Kinds", list(KINDS), **common.bind("pvm_kinds", ["q", "down"], allowed=KINDS))
    names = set(tables.select_layers(profile, blocks, kinds))
    chosen = [f for f in fits if f.name in names]
    if chosen:
        show_chart(figures.layer_fit_figure(profile, chosen, params), "pvm_layer_fig")
    else:
        st.info("Pick at least one block and one kind.")
    table = tables.layer_fit_frame(fits)
    with st.expander("Residuals of every layer (worst first)", expanded=False):
        st.dataframe(table, hide_index=True, key="pvm_layer_table",
                     column_config={c: st.column_config.NumberColumn(format="%.3f")
                                    for c in ("RMS residual (decades)", "worst residual", "at ratio")})


st.subheader("Whole plans: predicted Σ ε vs measured")
whole_plans()
st.subheader("Per layer: fitted curve vs measured points")
per_layer()
