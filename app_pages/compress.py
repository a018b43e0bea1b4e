"""Compress & evaluate: run chosen plans on the real model in the background, keep the results."""
from functools import partial

import streamlit as st

from lems_core import pipeline
from lems_core.allocators import MODEL_SCORED, allocate
from lems_core.cache import saved_plans
from lems_core.jobs import CANCELLED, DONE, for_each
from lems_core.plan import PlanError, RankPlan, parse_budgets, unique_plans
from lems_core.results import ResultStore
from app_pages import common, figures, tables

EVAL_JOB, EVAL_SEEN = "eval_job_id", "eval_job_seen"
DATASETS = ("wikitext2", "ptb", "c4")
GENERATED_METHODS = ("lems", "uniform", "svdllm_v2", "mrcs")  # solved here, from the profile
MODEL_SCORED_METHODS = tuple(MODEL_SCORED)  # atp, erc_plc, lcsvd_search: solved inside the job, on the model

profile = common.current_profile()
st.title("Compress & evaluate")
st.caption("Factorise the model with a rank plan, measure perplexity (and KL to the dense model), restore it. "
           "Results are stored in the cache and compared across methods below.")


def available_plans() -> dict[str, RankPlan]:
    """Label -> plan: the current one (Allocate page), the uploaded one and the saved files for this model."""
    plans = {}
    for key, label in (("current_plan", "current"), ("uploaded_plan", "uploaded")):
        plan = st.session_state.get(key)
        if plan is not None and plan.fingerprint == profile.fingerprint:
            plans[f"{label}: {tables.method_label(plan.method)} @ {plan.budget:.2f}"] = plan
    for path in saved_plans(common.cache_dir()):
        try:
            plan = RankPlan.load(path, layers=profile.layers, fingerprint=profile.fingerprint)
        except PlanError:
            continue  # a plan for another model (or a broken file): not offered here
        plans[f"saved: {path.name}"] = plan
    return plans


def generated_plans(methods: list[str], budgets_text: str) -> dict[str, RankPlan | pipeline.PlanRequest]:
    """Plans of ``methods`` at each budget under the current error model; failures are shown, not raised.

    Model-scored methods become PlanRequests, allocated later inside the evaluation job.
    """
    if not methods or not budgets_text.strip():
        return {}
    try:
        budgets = parse_budgets(budgets_text)
    except ValueError as exc:
        st.error(f"Budgets: {exc}")
        return {}
    params, plans = common.error_model_params(profile), {}
    for method in methods:
        for budget in budgets:
            label = f"new: {tables.method_label(method)} @ {budget:.2f}"
            if method in MODEL_SCORED:
                plans[label] = pipeline.PlanRequest(method, budget)
                continue
            try:
                alloc = allocate(profile, method, budget, params=params)
            except ValueError as exc:
                st.warning(f"{tables.method_label(method)} at {budget:g}: {exc}")
                continue
            plans[label] = alloc.to_plan(profile, meta={"calibration": profile.calibration})
    return plans


def _method_option(method: str) -> str:
    label = tables.method_label(method)
    return f"{label} (scored on the model)" if method in MODEL_SCORED else label


def run_form(plans: dict[str, RankPlan]) -> None:
    """Which plans, datasets, window cap and device; submitting starts one background job."""
    devices = common.devices()
    with st.form("evaluate"):
        chosen = st.multiselect("Plans", list(plans), default=list(plans)[:1],
                                help="The current plan (Allocate page), an uploaded one, or plans saved to the cache.")
        gen1, gen2 = st.columns(2)
        new_methods = gen1.multiselect(
            "…and/or new plans of", GENERATED_METHODS + MODEL_SCORED_METHODS, format_func=_method_option,
            help="LEMS and the baselines are solved now with the current error model (Allocate page settings). "
                 f"{', '.join(tables.method_label(m) for m in MODEL_SCORED_METHODS)} score candidate plans on the "
                 "model, so they are built inside the evaluation job (slower: one model pass per candidate).")
        budgets_text = gen2.text_input("at budgets (kept fractions)", value="0.6, 0.7, 0.8")
        decompositions = [tables.PLAN_DECOMPOSITION, *pipeline.decomposition_names()]
        factorise_with = st.selectbox(
            "Factorise with", decompositions, key="factorise_with",
            format_func=lambda name: tables.decomposition_label(name, pipeline.RANK_DEPENDENT),
            help="Each plan's ranks factorised with its own decomposition (the profile's), or with another one. "
                 "SAES-SVD, ERC-SVD and LC-SVD are computed for each plan's ranks (closed-loop / trained): "
                 "slower, cached per plan.")
        col1, col2, col3, col4 = st.columns(4)
        datasets = col1.multiselect("Datasets", DATASETS, default=["wikitext2"])
        windows = col2.number_input("Window cap (0 = all)", 0, 10_000, 16, step=8,
                                    help="Evaluate at most this many sequences per dataset (faster, noisier).")
        seq_len = col3.selectbox("Sequence length", (256, 512, 1024, 2048), index=3 if "cuda" in devices else 1)
        device = col4.selectbox("Device", devices)
        submitted = st.form_submit_button("Compress & evaluate", type="primary")
    if not submitted:
        return
    selected = unique_plans({c: plans[c] for c in chosen} | generated_plans(new_methods, budgets_text))
    if not selected or not datasets:
        st.error("Choose at least one plan and one dataset.")
        return
    if common.job_registry().active("eval"):
        st.error("An evaluation is already running; wait for it or cancel it.")
        return
    task = partial(pipeline.evaluate_and_store, profile=profile, cache_dir=common.cache_dir(),
                   params=common.error_model_params(profile), decomposition=factorise_with or None,
                   datasets=list(datasets), max_windows=int(windows) or None, seq_len=int(seq_len), device=device)
    job = common.job_registry().submit(f"evaluate {len(selected)} plan(s)", for_each, task,
                                       list(selected.values()), meta={"kind": "eval"})
    st.session_state[EVAL_JOB] = job.id


@st.fragment(run_every=1)
def job_panel() -> None:
    """Progress and cancel of the running evaluation; one full rerun when it ends, to refresh the results."""
    state = common.show_job(EVAL_JOB, "evaluation")
    if state is None or not state.done:
        return
    common.rerun_app_once(state, EVAL_SEEN)
    if state.status == DONE:
        skipped = [r for r in state.result if "error" in r]
        st.success(f"Evaluated {len(state.result) - len(skipped)} plan(s) in {state.elapsed:.0f} s.")
        for r in skipped:
            st.warning(f"{tables.method_label(r['method'])} at {r['budget']:g}: {r['error']}")
    elif state.status == CANCELLED:
        st.caption("Plans evaluated before the cancel are stored.")


def results_section() -> None:
    """Stored results as a table and perplexity vs realised ratio per method."""
    records = ResultStore(common.cache_dir()).all()
    show_all = st.toggle("Results of all models", value=False, key="results_all")
    if not show_all:
        records = [r for r in records if r.get("fingerprint") == profile.fingerprint]
    if not records:
        st.info("No stored results for this model yet.")
        return
    frame = tables.results_frame(records)
    datasets = tables.ppl_datasets(frame)
    if datasets:
        dataset = st.radio("Dataset", datasets, horizontal=True, key="results_dataset")
        st.plotly_chart(figures.ppl_vs_ratio_figure(frame, dataset), key="ppl_ratio_fig")
    st.dataframe(frame, hide_index=True)


if common.is_synthetic():
    st.warning("The synthetic demo profile has no real model behind it: pick or build a real profile to evaluate.")
else:
    run_form(available_plans())
    job_panel()
st.subheader("Results")
results_section()
