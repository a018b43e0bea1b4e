"""Allocate: a live budget slider re-solving LEMS (exact MCKP) against the baseline allocators.

Everything that reacts to the error model, the methods or the constraints lives in one
st.fragment, and what reacts to the budget in a second one inside it, so a budget move
reruns (and the browser redraws) only the results under the slider. The plan chosen for export is kept
in st.session_state["current_plan"] for the Compress & evaluate page.
"""
import json

import streamlit as st

from lems_core import pipeline
from lems_core.allocators import ALLOCATORS, MODEL_SCORED, Allocation, allocate, ars
from lems_core.allocators.lems import lems_min_budget
from lems_core.cache import plans_dir
from lems_core.constraints import RANK_MULTIPLES, ConstraintError, LayerConstraints, parse_fractions
from lems_core.error_model import ErrorModelParams
from lems_core.jobs import DONE, JobLimitError
from lems_core.latency import LatencyCost
from lems_core.model import KINDS
from lems_core.plan import PlanError, parse_budgets, plan_file_name, plan_from_upload
from lems_core.run import Run
from app_pages import common, figures, tables
from app_pages.chart_view import show_chart
from app_pages.allocate_latency import (cost_controls, known_latency, latency_sweep_frame, refused_under,
                                      selected_latency, with_latency)
from app_pages.style import display_names_in

CURRENT_PLAN, UPLOADED_PLAN = "current_plan", "uploaded_plan"
ARS_JOB, ARS_SEEN = "ars_job_id", "ars_job_seen"
LIVE_METHODS = [m for m in ("lems", "lems_fixed", "uniform", "svdllm_v2", "mrcs", "asvd", "ars") if m in ALLOCATORS]
DEFAULT_METHODS = [m for m in ("lems", "uniform", "svdllm_v2", "mrcs", "ars") if m in LIVE_METHODS]

profile = common.current_profile()
profile_id = common.current_profile_id()
DEFAULT_BUDGET = 0.8


@st.cache_data(max_entries=1024, show_spinner=False)
def solve(_profile, profile_id: str, method: str, ratio: float, params: dict, constraints: str = "",
          cost_key: str = "", _cost: LatencyCost | None = None) -> Allocation:
    """One allocator run, cached per (profile, method, budget, error model, constraints JSON, cost).

    ``_cost`` is the latency cost whose ``key`` is ``cost_key`` (None: a parameter budget).

    LEMS uses the bias controls (which start from the profile's fit); LEMS (fixed bias)
    always uses the fixed default alpha=0, gamma=5 with the other error-model settings."""
    if method == "lems_fixed":
        defaults = ErrorModelParams()
        params = {**params, "alpha": defaults.alpha, "gamma": defaults.gamma, "bias_form": defaults.bias_form}
    return allocate(_profile, method, ratio, params=ErrorModelParams.from_dict(params),
                    constraints=LayerConstraints.from_dict(json.loads(constraints)) if constraints else None,
                    cost=_cost or "params")


def solve_all(methods: list[str], ratio: float, params, constraints: LayerConstraints | None = None,
              cost: LatencyCost | None = None) -> tuple[dict[str, Allocation], dict[str, str]]:
    """Allocations of every method that can run at this budget, and the messages of those that cannot."""
    done, failed = {}, {}
    key = "" if constraints is None or constraints.is_empty else constraints.key()
    for method in methods:
        try:
            done[method] = solve(profile, profile_id, method, ratio, params.to_dict(), key,
                                 cost.key if cost else "", cost)
        except ValueError as exc:  # InfeasibleBudgetError, missing measurements, no ARS plan, ...
            failed[method] = tables.failure_message(method, exc)
    return done, failed


@st.cache_data(max_entries=64, show_spinner=False)
def lems_minimum(_profile, profile_id: str, cost_key: str = "", _cost: LatencyCost | None = None) -> float:
    """The smallest budget (2 decimals, below the slider's top) at which LEMS has a solution: the slider starts there.

    A fraction of the dense parameters, or under ``_cost`` (whose ``key`` is ``cost_key``)
    of the dense latency: every layer at its cheapest option in that cost."""
    return min(lems_min_budget(_profile, cost_model=_cost or "params"), round(SLIDER_MAX - 0.01, 2))


OWN_MULTIPLE = 0  # the Rank multiple picker's "allocator's own": a selectbox shows None as no choice at all
CONSTRAINT_DEFAULTS = {"lock_blocks": [], "lock_kinds": [], "lock_names": "", "exclude_blocks": [],
                       "exclude_kinds": [], "exclude_names": "", "min_kept": "", "max_kept": "",
                       "rank_multiple": OWN_MULTIPLE}


def constraint_controls() -> tuple[bool, LayerConstraints | None]:
    """The Layer constraints expander: (valid, the constraints or None when none are set).

    Invalid input shows its specific error and drops the kept plan (the caller stops)."""
    with st.expander("Layer constraints", expanded=False):  # a label that changed would collapse it
        st.caption("**Lock dense**: stays dense, its parameters count in the budget (the others pay for it). "
                   "**Exclude**: not compressed and outside the budget (the budget applies to the rest). "
                   "Kept fraction = rank / eq rank, where eq rank ⌊m·n/(m+n)⌋ is the break-even rank at which a "
                   "factorisation stores as many weights as the dense matrix. LEMS honours them exactly (they remove "
                   "knapsack options); "
                   "Uniform, SVD-LLM V2 and MRCS are projected onto them; ASVD and ARS do not take them.")
        blocks, kinds = list(range(profile.num_blocks)), [k for k in KINDS if any(l.kind == k for l in profile.layers)]
        for what in ("lock", "exclude"):
            a, b, c = st.columns(3)
            label = "Lock dense" if what == "lock" else "Exclude"
            a.multiselect(f"{label}: blocks", blocks, **_bind(f"{what}_blocks", allowed=blocks))
            b.multiselect(f"{label}: kinds", kinds, **_bind(f"{what}_kinds", allowed=kinds))
            c.text_input(f"{label}: layer names", placeholder="e.g. *.layers.3.mlp.down_proj", **_bind(f"{what}_names"),
                         help="Comma-separated names or fnmatch patterns.")
        a, b, c = st.columns(3)
        a.text_input("Min kept fraction per kind", placeholder="e.g. q=0.3, k=0.5", **_bind("min_kept"))
        b.text_input("Max kept fraction per kind", placeholder="e.g. down=0.8 (below 1 forbids dense)",
                     **_bind("max_kept"))
        multiples = [OWN_MULTIPLE, *RANK_MULTIPLES]
        c.selectbox("Rank multiple", multiples, **_bind("rank_multiple", allowed=multiples),
                    format_func=lambda m: "allocator's own (LEMS: 8)" if m == OWN_MULTIPLE else str(m),
                    help="Every factorised rank a multiple of this (hardware alignment).")
        constraints = _kept_constraints()
        if constraints is not None and not constraints.is_empty:
            st.info(f"**Active:** {constraints_summary(constraints)}.", icon=":material/rule:")
    if constraints is None:
        st.error(f"Layer constraints: {st.session_state.get('constraint_error')}")
        st.session_state.pop(CURRENT_PLAN, None)
        return False, None
    return True, None if constraints.is_empty else constraints


def constraints_summary(constraints: LayerConstraints) -> str:
    """What the set constraints do, in a few words ("2 selector(s) locked dense · rank multiple 16")."""
    c = constraints
    parts = [f"{len(c.lock_dense)} selector(s) locked dense" if c.lock_dense else "",
             f"{len(c.exclude)} selector(s) excluded" if c.exclude else "",
             "min kept " + ", ".join(f"{k}={v:g}" for k, v in c.min_kept.items()) if c.min_kept else "",
             "max kept " + ", ".join(f"{k}={v:g}" for k, v in c.max_kept.items()) if c.max_kept else "",
             f"rank multiple {c.rank_multiple}" if c.rank_multiple else ""]
    return " · ".join(p for p in parts if p)


def _bind(name: str, allowed=None) -> dict:
    return common.bind(f"con_{name}", CONSTRAINT_DEFAULTS[name], allowed=allowed)


def _kept_constraints() -> LayerConstraints | None:
    """LayerConstraints from the kept control values; None (and the message kept) when they are invalid."""
    v = {name: common.kept(f"con_{name}", default) for name, default in CONSTRAINT_DEFAULTS.items()}

    def selectors(what: str) -> tuple[str, ...]:
        names = [n.strip() for n in str(v[f"{what}_names"]).split(",") if n.strip()]
        return tuple([f"block:{b}" for b in v[f"{what}_blocks"]] + [f"kind:{k}" for k in v[f"{what}_kinds"]]
                     + [f"name:{n}" for n in names])
    try:
        constraints = LayerConstraints(lock_dense=selectors("lock"), exclude=selectors("exclude"),
                                       min_kept=parse_fractions(v["min_kept"]), max_kept=parse_fractions(v["max_kept"]),
                                       rank_multiple=v["rank_multiple"] or None)
        if not constraints.is_empty:
            constraints.resolve(profile.layers)
    except (ConstraintError, OverflowError) as exc:  # typed text: a number too large for a float is a message too
        st.session_state["constraint_error"] = str(exc)
        return None
    return constraints


def upload_section() -> None:
    """Load a plan JSON for this model; bad files get the PlanError message."""
    uploaded = st.file_uploader("Upload a plan JSON", type=["json"], key="plan_upload",
                                help="A lems-rank-plan/1 file for this model, or a loadconfig file {layer: ratio or "
                                     "rank} as the reference writes it (both downloaded here earlier, for example).")
    if uploaded is None:
        st.session_state.pop(UPLOADED_PLAN, None)
        return
    try:
        plan = plan_from_upload(uploaded.getvalue(), profile.layers, profile.fingerprint, profile.model_source,
                                profile.decomposition)
    except PlanError as exc:
        st.session_state.pop(UPLOADED_PLAN, None)
        st.error(f"Cannot use {uploaded.name}: {display_names_in(str(exc))}")
        return
    st.session_state[UPLOADED_PLAN] = plan
    st.success(f"Loaded {uploaded.name}: {tables.method_label(plan.method)} plan, budget {plan.budget:.3f}, "
               f"realised {plan.summary['realised_ratio']:.4f}. It is compared below as “uploaded”.")


def headline(allocations: dict[str, Allocation], table) -> None:
    """Solve time, objective, realised ratio and predicted error of the kept plan (vs Uniform's error)."""
    key = common.kept("plan_method", "lems")
    if key not in allocations:
        return
    name, rows = _label(key), table.set_index("method")
    row, base = rows.loc[name], rows["predicted error"].get(tables.method_label("uniform"))
    cols = st.columns(4)
    cols[0].metric(f"{name} solve time", "—" if key == "uploaded" else _number(row["solve ms"], "{:.1f} ms", "—"))
    objective = f"{name} objective" + (" (Σ ε)" if key.startswith("lems") else "")
    cols[1].metric(objective, _number(row["objective"], "{:.4g}"),
                   help=None if row["objective"] == row["objective"] else f"n/a: {NO_OBJECTIVE}")
    cols[2].metric(f"{name} realised ratio", f"{row['realised ratio']:.4f}")
    ours = row["predicted error"]
    delta = f"{100 * (ours - base) / base:+.1f} % vs uniform" if base and key != "uniform" else None
    cols[3].metric(f"{name} predicted error", f"{ours:.4g}", delta, delta_color="inverse")


NO_OBJECTIVE = ("this method follows a rule (uniform ranks, a score, a trained or uploaded plan) instead of "
                "minimising an objective of its own; only the LEMS variants solve for Σ ε")


def _number(value, fmt: str, missing: str = "n/a") -> str:
    """``fmt`` of a table cell, or ``missing`` where the method has no such number (NaN)."""
    return missing if value != value else fmt.format(value)


def displayed(table):
    """The comparison table as shown: a missing objective reads "n/a" (explained in its column help), not "None"."""
    return table.assign(objective=[_number(v, "{:.4g}") for v in table["objective"]])


def plan_panel(allocations: dict[str, Allocation], failed: dict[str, str], options: list[str]) -> None:
    """Choose the plan to keep, show its summary, download it or save it to the cache.

    The kept method is the user's choice only: when it cannot allocate at this budget
    the page says so and keeps no plan, instead of switching to another method.
    """
    # Display names that do not change with what is uploaded: an option whose name changes is another option.
    st.selectbox("Plan to keep", options, format_func=tables.method_label, **common.bind("plan_method", "lems"))
    choice = st.session_state.plan_method
    if choice not in allocations:
        st.session_state.pop(CURRENT_PLAN, None)
        st.container(key="plan_summary").warning(_no_plan_message(choice, failed), icon=":material/block:")
        return
    plan = st.session_state[UPLOADED_PLAN] if choice == "uploaded" else allocations[choice].to_plan(
        profile, meta={"calibration": profile.calibration})
    st.session_state[CURRENT_PLAN] = plan
    summary = plan.summary
    st.container(key="plan_summary").markdown(f"**Current plan:** {_label(choice)} at budget {plan.budget:.2f} → realised ratio "
                f"{summary['realised_ratio']:.4f}, {summary['num_layers'] - summary['dense_layers']} layers factorised, "
                f"{summary['dense_layers']} dense, {tables.human_count(summary['params_kept'])} of "
                f"{tables.human_count(summary['params_total'])} params{_latency_note(plan)}")
    name = plan_file_name(plan.method, plan.budget, plan.fingerprint, plan.content_hash)
    col1, col2, col3 = st.columns(3)
    # Callables: the JSON is written on click, not on every budget move (tens of ms on large models).
    col1.download_button("Download plan JSON", plan.to_json, file_name=name, mime="application/json",
                         on_click="ignore", key="download_plan", icon=":material/download:")
    col2.download_button("Download loadconfig JSON", lambda: json.dumps(plan.to_loadconfig(), indent=1),
                         file_name=name.replace(".json", "_loadconfig.json"), mime="application/json",
                         on_click="ignore", key="download_loadconfig", icon=":material/download:",
                         help="The reference's {layer: ratio} file, ratio = rank / eq rank (1.0 = dense; eq rank = "
                              "⌊m·n/(m+n)⌋, the break-even rank). Upload it back under “Upload a plan”.")
    if col3.button("Save plan to cache", key="save_plan", icon=":material/save:"):
        path = plan.save(plans_dir(common.cache_dir()) / name)
        st.toast(f"Saved {path.name}")


def _latency_note(plan) -> str:
    """The plan's latency budget and predicted latency, when it was allocated under one."""
    cost = (plan.meta or {}).get("cost")
    if not cost or cost.get("kind") != "latency":
        return ""
    return (f"; latency budget {cost['budget']:.2f} → predicted {cost['predicted_latency_fraction']:.4f} of the "
            f"dense {cost['workload'].get('kind', '')} latency")


def _no_plan_message(choice: str, failed: dict[str, str]) -> str:
    """Why no plan is kept, and what would help: the budget only where the method failed at this budget."""
    if choice == "uploaded":
        return ("**No plan kept:** no plan is uploaded (or the upload was refused, see above). Upload a plan or "
                "loadconfig file under “Upload a plan”, or choose another plan to keep.")
    why = failed.get(choice) or "it is not among the methods"
    return (f"**No plan kept:** {_label(choice)} cannot allocate here ({why}). Change the budget or the "
            "constraints, or choose another plan to keep.")


def comparison_views(ranks: dict[str, dict], table, errors: dict[str, dict]) -> None:
    """Summary table, block x kind heatmaps, their difference, and kept fraction and error per block."""
    st.dataframe(displayed(table), hide_index=True,
                 column_config={"realised ratio": st.column_config.NumberColumn(format="%.4f"),
                                "predicted error": st.column_config.NumberColumn(format="%.4g"),
                                "objective": st.column_config.TextColumn(help=f"n/a: {NO_OBJECTIVE}."),
                                "solve ms": st.column_config.NumberColumn(format="%.1f"),
                                **_latency_format(table)})
    st.caption("Realised ratio: kept fraction of the compressible parameters. Predicted latency: the plan's "
               "compressible latency as a fraction of dense under this machine's device profile (the selected "
               "workload, else the decode one when cached; — when none is measured yet).")
    cells = ("cells show the rank (D = dense)" if figures.heatmap_labelled(profile.num_blocks)
             else "hover a cell for its rank (D = dense)")
    st.caption("Predicted error: the LEMS surrogate Σ ε_l under the current error model, for every method. "
               f"Heatmaps: kept fraction rank·(m+n)/(m·n) per block and kind (1 = dense), {cells}.")
    measured_here(float(common.kept("budget", DEFAULT_BUDGET)), common.error_model_params(profile))
    labels = {label: _label(label) for label in ranks}
    show_chart(figures.rank_heatmaps_figure(profile, ranks, labels), "rank_heatmaps_fig")
    diff, _ = st.columns(2)
    with diff:
        a, b = st.columns(2)
        options = list(ranks)
        first = a.selectbox("Difference: A", options, format_func=_label,
                            **common.bind("diff_a", options[0], allowed=options))
        second = b.selectbox("minus B", options, format_func=_label,
                             **common.bind("diff_b", options[min(1, len(options) - 1)], allowed=options))
        fig = figures.heatmap_figure(tables.difference_grid(profile, ranks[first], ranks[second]),
                                     f"Kept fraction: {_label(first)} − {_label(second)}", "Δ kept", diverging=True)
        show_chart(fig, "diff_fig")
    show_chart(figures.block_views_figure(profile, ranks, errors, labels), "block_views_fig")


def _latency_format(table) -> dict:
    """A number format for the predicted latency column when it holds numbers (not the "—" of unknown)."""
    numeric = table["predicted latency"].dtype.kind == "f"
    return {"predicted latency": st.column_config.NumberColumn(format="%.4f")} if numeric else {}


@st.cache_data(max_entries=256, show_spinner=False)
def measured_table(_profile, profile_id: str, budget: float, params: dict, stamp: tuple):
    """(measured results at ``budget`` with their predicted Σ ε, all measured budgets, problems), per results version.

    Cached: scoring each result's ranks costs about a millisecond per result on the demo,
    and the fragment reruns on every budget move."""
    merged = common.merged_results()
    frame = tables.measured_at_budget(merged.records, _profile, budget, ErrorModelParams.from_dict(params))
    return frame, tables.measured_budgets(merged.records, _profile.fingerprint), merged.problems


def measured_here(budget: float, params: ErrorModelParams) -> None:
    """Measured results of this model at this budget (shipped with the demo or stored), next to the live comparison."""
    frame, budgets, problems = measured_table(profile, profile_id, budget, params.to_dict(),
                                              common.results_stamp())
    for problem in problems:
        st.error(problem)
    if frame.empty:
        if budgets:
            st.caption("Measured results of this model exist at budget(s) "
                       f"{', '.join(f'{b:.2f}' for b in budgets)}: move the budget there to see them here.")
        return
    st.markdown(f"**Measured at budget {budget:.2f}** (real compression + evaluation of these allocators' plans)")
    st.dataframe(frame, hide_index=True, key="measured_here",
                 column_config={"realised ratio": st.column_config.NumberColumn(format="%.4f"),
                                "KL": st.column_config.NumberColumn(format="%.4g"),
                                "predicted Σ ε": st.column_config.NumberColumn(format="%.4g")})
    st.caption("KL to the dense model and perplexity as measured (protocol per row: 'quick' is 8 x 512 tokens); "
               "predicted Σ ε is each result's ranks under the current error model. Source 'shipped': the demo "
               "study in cache/demo/results.json; 'yours': your own runs (Compress & evaluate). "
               "Predicted vs measured over all results: the *Predicted vs measured* page.")


@st.fragment
def live_allocation() -> None:
    """Error model, methods and constraints, then the budget view they feed (a fragment of its own)."""
    with st.expander("Error model (shape · scale · bias)", expanded=False):
        common.error_model_controls(profile)
    st.multiselect("Methods", LIVE_METHODS, format_func=tables.method_label,
                   **common.bind("compare_methods", DEFAULT_METHODS),
                   help="Allocators solved live from the profile; ASVD needs measured points.")
    valid, constraints = constraint_controls()
    if not valid:
        return
    scored = ", ".join(tables.method_label(m) for m in MODEL_SCORED)
    st.caption(f"Model-scored allocators ({scored}) evaluate candidate plans on the model, so they are not solved "
               "live: build and evaluate them on the Compress & evaluate page (“…and/or new plans of”).")
    st.caption(tables.error_model_summary(common.error_model_params(profile), profile.kl_ref is not None))
    usable, cost = cost_controls(profile, profile_id)
    if usable:
        budget_view(constraints, cost)


@st.fragment
def budget_view(constraints: LayerConstraints | None, cost: LatencyCost | None = None) -> None:
    """Budget -> the kept plan's summary, then every compared method -> compare, keep and export a plan.

    A fragment inside ``live_allocation``: a budget move reruns only this, so the browser
    redraws the results and not the controls above. The kept method is solved and its
    summary sent first; the other methods are solved and the charts drawn after, so what a
    budget move is for reaches the browser while the rest is still being computed.
    """
    budget = budget_slider(cost)
    params = common.error_model_params(profile)
    refused = refused_under(cost, st.session_state.compare_methods)
    for method in refused:
        st.info(f"{tables.method_label(method)} allocates under a parameter budget only: left out of the latency "
                "comparison.", icon=":material/timer_off:")
    methods = [m for m in st.session_state.compare_methods if m not in refused]
    notes, head, summary = st.container(), st.container(), st.container()
    chosen = common.kept("plan_method", "lems")
    first = [chosen] if chosen in LIVE_METHODS and not refused_under(cost, [chosen]) else []
    allocations, failed = solve_all(first, budget, params, constraints, cost)
    allocations |= uploaded_allocation()
    refusals = {m: "it allocates under a parameter budget only" for m in refused}
    with summary:
        plan_panel(allocations, failed | refusals, plan_options([*methods, *refused], chosen))
    others, others_failed = solve_all([m for m in methods if m not in first], budget, params, constraints, cost)
    allocations, failed = _in_order(allocations | others, methods), _in_order(failed | others_failed, methods)
    with notes:
        failure_notes(failed)
    if not allocations:
        notes.info("No method could allocate at this budget.")
        return
    ranks = {label: alloc.ranks for label, alloc in allocations.items()}
    errors = tables.predicted_error_tables(profile, ranks, params)
    table = tables.comparison_table(profile, allocations, errors, {label: _label(label) for label in allocations})
    table = with_latency(table, allocations, cost or known_latency(profile, profile_id), profile)
    with head:
        headline(allocations, table)
    comparison_views(ranks, table, errors)


SLIDER_MAX = 0.95


def budget_slider(cost: LatencyCost | None) -> float:
    """The budget slider, from the smallest budget LEMS can meet in the cost's units; returns the budget."""
    low = lems_minimum(profile, profile_id, cost.key if cost else "", cost)
    if common.kept("budget", DEFAULT_BUDGET) < low:
        common.set_kept("budget", low)
    what = "compressible parameters" if cost is None else f"dense compressible {cost.workload.kind} latency"
    floor = ("every layer at its smallest candidate rank" if cost is None else
             "every layer at its fastest option: its smallest candidate rank, or dense where that is faster")
    st.slider(f"Budget: kept fraction of the {what}", low, SLIDER_MAX, step=0.01,
              **common.bind("budget", DEFAULT_BUDGET),
              help="ρ of docs/reference/methods.md §0: Σ_l params_l ≤ ρ Σ_l m_l n_l over the compressible "
                   "Linears; under a latency cost, Σ_l time_l ≤ ρ Σ_l dense time_l instead. It starts at "
                   f"{low:.2f}, the smallest budget LEMS can meet ({floor}).")
    return float(st.session_state.budget)


def uploaded_allocation() -> dict[str, Allocation]:
    """The uploaded plan as an allocation to compare ("uploaded"), or nothing."""
    if UPLOADED_PLAN not in st.session_state:
        return {}
    plan = st.session_state[UPLOADED_PLAN]
    return {"uploaded": Allocation(plan.method, plan.budget, plan.ranks())}


def plan_options(methods: list[str], choice: str) -> list[str]:
    """The "Plan to keep" choices: the compared methods in their order, the kept one, and "uploaded" when there is one.

    From the methods asked for, not from which of them could allocate: the choices stay
    put as the budget moves, and the picker is drawn before the other methods are solved."""
    uploaded = ["uploaded"] if UPLOADED_PLAN in st.session_state or choice == "uploaded" else []
    return list(dict.fromkeys([*methods, choice, *uploaded]))


def failure_notes(failed: dict[str, str]) -> None:
    """Why each method that could not allocate at this budget did not (ARS's usual gap as a note)."""
    for method, message in failed.items():
        if method == "ars":  # expected at most budgets: plans exist only where ARS was trained
            st.info(f"ARS: {message}", icon=":material/school:")
        else:
            st.warning(f"{tables.method_label(method)}: {message}")


def _in_order(found: dict, methods: list[str]) -> dict:
    """``found`` with the compared methods first, in the order they were asked for."""
    return {key: found[key] for key in dict.fromkeys([*methods, *found]) if key in found}


@st.cache_data(max_entries=64, show_spinner="Sweeping budgets…")
def sweep(_profile, profile_id: str, methods: tuple[str, ...], params: dict, constraints: str, cost_key: str = "",
          _cost: LatencyCost | None = None):
    """``tables.sweep_frame``, or under ``_cost`` (whose ``key`` is ``cost_key``) the latency-budget sweep."""
    model = ErrorModelParams.from_dict(params)
    limits = LayerConstraints.from_dict(json.loads(constraints)) if constraints else None
    if _cost is not None:
        return latency_sweep_frame(_profile, methods, model, _cost, constraints=limits)
    return tables.sweep_frame(_profile, methods, model, constraints=limits)


def sweep_section() -> None:
    """Predicted error against the budget for every compared method, in the cost the budget counts.

    Under a parameter budget, x is the realised param ratio and the measured KL of stored
    results is overlaid; under a latency cost, the budgets are latency fractions and x is
    each plan's predicted latency fraction."""
    with st.expander("Budget sweep (predicted error vs budget)", expanded=False):
        if not st.toggle("Sweep budgets 0.30-0.95", **common.bind("sweep_on", False)):
            st.caption("Solves every compared method at 14 budgets under the current error model, constraints "
                       "and budget kind (parameters or latency).")
            return
        constraints = _kept_constraints()
        if constraints is None:
            st.caption("Fix the layer constraints first.")
            return
        cost = selected_latency(profile, profile_id)
        if common.kept("cost_kind", "params") != "params" and cost is None:
            st.caption("The latency cost is not measured yet: choose it under “Budget counts” above first.")
            return
        key = "" if constraints.is_empty else constraints.key()
        methods = tuple(m for m in common.kept("compare_methods", DEFAULT_METHODS)
                        if m != "ars" and m not in refused_under(cost, [m]))
        frame = sweep(profile, profile_id, methods, common.error_model_params(profile).to_dict(), key,
                      cost.key if cost else "", cost)
        records = common.merged_results().records  # stored and shipped; problems are shown above
        show_chart(figures.budget_sweep_figure(frame, tables.measured_points(records, profile.fingerprint),
                                               "params" if cost is None else "latency"), "sweep_fig")
        st.caption("Lines: predicted Σ ε (left axis). Crosses: measured KL of this model's results, the shipped "
                   "demo study and your own (right axis, another unit: compare the order, not the height)."
                   if cost is None else
                   f"Lines: predicted Σ ε (left axis) at latency budgets 0.30-0.95, against each plan's predicted "
                   f"{cost.workload.kind} latency as a fraction of dense. Measured results are drawn under a "
                   "parameter budget (their latency is not measured).")


def ars_section() -> None:
    """Train ARS plans for this profile in the background (they then appear as "ARS" above)."""
    with st.expander("Train ARS plans (learned rank selection)", expanded=False):
        st.caption("ARS trains a small hypernetwork over the rank masks of the real model, one run per budget "
                   "(minutes on a CPU for the demo model with the cpu-small preset). Plans are cached.")
        if common.is_synthetic():
            st.info("ARS needs a real model: pick or build a real profile.")
            return
        with st.form("ars_form"):
            col1, col2, col3 = st.columns(3)
            budgets = col1.text_input("Budgets (kept fractions)", value=f"{st.session_state.budget:.2f}")
            presets = list(ars.PRESETS)
            preset = col2.selectbox("Preset", presets, index=presets.index("cpu-small") if "cpu-small" in presets else 0)
            device = col3.selectbox("Device", common.devices())
            submitted = st.form_submit_button("Train ARS")
        if submitted:
            start_ars_training(budgets, preset, device)
        ars_progress()


def start_ars_training(budgets: str, preset: str, device: str) -> None:
    try:
        ratios = parse_budgets(budgets)
    except (ValueError, OverflowError) as exc:
        st.error(f"Budgets: {exc}")
        return
    if not ratios or common.job_registry().active("ars"):
        st.error("Give at least one budget; only one ARS training runs at a time.")
        return
    try:
        job = pipeline.launch_ars_training(common.job_registry(), st.session_state[common.PROFILE_KEY], ratios, preset,
                                           run=Run(device=device))
    except JobLimitError as exc:
        st.error(f"ARS training not started: {exc}")
        return
    st.session_state[ARS_JOB] = job.id


def ars_progress() -> None:
    """The ARS training job: polled every second while it runs, drawn once otherwise.

    Every poll is a rerun, and a rerun queued beside a budget move delays the move's."""
    registry = common.job_registry()
    job = registry.get(st.session_state.get(ARS_JOB))
    running = (job is not None and not job.snapshot().done) or bool(registry.active("ars"))
    (_ars_poll if running else _ars_status)()


def _ars_status() -> None:
    """Progress and cancel, or the outcome; when the job ends, forget cached solves and redraw the comparison."""
    state = common.show_job(ARS_JOB, "ARS training", kind="ars")
    if state is None or not state.done:
        return
    if st.session_state.get(ARS_SEEN) != state.id:
        solve.clear()
    common.rerun_app_once(state, ARS_SEEN)
    if state.status == DONE:
        st.success(f"ARS trained {len(state.result)} plan(s) in {state.elapsed:.0f} s.")


_ars_poll = st.fragment(_ars_status, run_every=1)


def _label(key: str) -> str:
    if key == "uploaded" and UPLOADED_PLAN in st.session_state:
        return f"uploaded ({tables.method_label(st.session_state[UPLOADED_PLAN].method)})"
    return tables.method_label(key)


st.title("Allocate")
st.caption(f"{profile.model_source} · {profile.decomposition} · {len(profile.layers)} layers. LEMS minimises the "
           "summed error model exactly under the budget; the others are the baseline allocators.")
with st.expander("Upload a plan", expanded=False):
    upload_section()
live_allocation()
sweep_section()
ars_section()
