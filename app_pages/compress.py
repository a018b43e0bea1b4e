"""Compress & evaluate: run chosen plans on the real model in the background, keep the results."""
from functools import partial

import pandas as pd
import streamlit as st

from lems_core import pipeline
from lems_core.allocators import MODEL_SCORED, allocate
from lems_core.cache import saved_plans
from lems_core.eval_time import EvalEstimate, estimate_eval
from lems_core.evaluation import QUICK_EVAL, REFERENCE_EVAL, EvalProtocol
from lems_core.jobs import CANCELLED, DONE, JobLimitError, for_each, format_seconds
from lems_core.latency.model_timing import (MAX_REPEATS, PROMPT_TOKENS, REPEATS, ModelTiming, ModelTimingError,
                                            TimingSettings, comparison_rows)
from lems_core.plan import PlanError, RankPlan, parse_budgets, unique_plans
from lems_core.recovery import DEFAULT_LR, RecoveryConfig, RecoveryError, check_not_evaluation_text
from lems_core.results import SHIPPED, ResultStore, shipped_note
from lems_core.run import Run
from lems_core.zero_shot import PAPER_TASKS, TASKS_DIR_ENV, TaskYAMLError, check_task_yaml, offered_task_files
from app_pages import common, figures, tables

EVAL_JOB, EVAL_SEEN = "eval_job_id", "eval_job_seen"
PENDING = "pending_eval"  # a reference-protocol run on a CPU, waiting for the user's confirmation
DATASETS = ("wikitext2", "ptb", "c4")
GENERATED_METHODS = ("lems", "uniform", "svdllm_v2", "mrcs")  # solved here, from the profile
MODEL_SCORED_METHODS = tuple(MODEL_SCORED)  # atp, erc_plc, lcsvd_search: solved inside the job, on the model
RECOVERY_STEPS = 50  # default LoRA steps: a few minutes for the demo model on a CPU
MAX_EVALUATIONS = 24  # plans one submission may queue: each is a model pass (hours with zero-shot tasks)

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


def form_budgets(methods: list[str], budgets_text: str) -> list[float] | None:
    """The budgets of new plans ([] without methods or text); None, after st.error, when one is malformed."""
    if not methods or not budgets_text.strip():
        return []
    try:
        return parse_budgets(budgets_text)
    except ValueError as exc:
        st.error(f"Budgets: {exc}")
        return None


def within_evaluation_cap(chosen: list[str], methods: list[str], budgets: list[float]) -> bool:
    """Whether one submission asks for at most MAX_EVALUATIONS plans; st.error naming the cap otherwise.

    Counted before any plan is solved, so an oversized request costs nothing.
    """
    requested = len(chosen) + len(methods) * len(budgets)
    if requested <= MAX_EVALUATIONS:
        return True
    st.error(f"This asks for {requested} evaluations ({len(chosen)} plan(s) + {len(methods)} method(s) x "
             f"{len(budgets)} budget(s)); one submission may queue at most {MAX_EVALUATIONS}. "
             "Choose fewer plans, methods or budgets.")
    return False


def generated_plans(methods: list[str], budgets: list[float]) -> dict[str, RankPlan | pipeline.PlanRequest]:
    """Plans of ``methods`` at each budget under the current error model; failures are shown, not raised.

    Model-scored methods become PlanRequests, allocated later inside the evaluation job.
    """
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
                st.warning(f"{tables.method_label(method)} at {budget:g}: {tables.failure_message(method, exc)}")
                continue
            plans[label] = alloc.to_plan(profile, meta={"calibration": profile.calibration})
    return plans


def _method_option(method: str) -> str:
    label = tables.method_label(method)
    return f"{label} (scored on the model)" if method in MODEL_SCORED else label


def run_form(plans: dict[str, RankPlan]) -> None:
    """Which plans, datasets, window cap and device; submitting starts one background job.

    Not an st.form: the Quick and zero-shot toggles disable the fields they make irrelevant,
    which needs a rerun. A reference-protocol run on a CPU waits for confirmation (``PENDING``).
    """
    devices = common.devices()
    with st.container(border=True, key="evaluate"):
        if not plans:
            no_plan_hint()
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
        quick = col2.toggle("Quick protocol", **common.bind("quick_protocol", devices[0] == "cpu"),
                            help=f"Quick (the default on a CPU): the first {QUICK_EVAL.max_windows} windows of "
                                 f"{QUICK_EVAL.seq_len} tokens, minutes on a CPU; results are marked 'quick' and are "
                                 "not comparable with published numbers. Off: the reference protocol, all "
                                 f"{REFERENCE_EVAL.seq_len}-token windows as the paper (WikiText-2 takes about an "
                                 "hour on a CPU for the demo model; you are asked first).")
        windows = col2.number_input("Window cap (0 = all)", 0, 10_000, 0, step=8, disabled=quick,
                                    help="Only with the reference protocol (Quick off): evaluate at most this many "
                                         "windows (the result is then marked 'custom').")
        seq_len = col3.selectbox("Sequence length", (256, 512, 1024, 2048), index=3, disabled=quick,
                                 help="Only with the reference protocol, Quick off (2048 = the paper's).")
        if quick:
            col3.caption(f"Quick: the first {QUICK_EVAL.max_windows} windows of {QUICK_EVAL.seq_len} tokens.")
        device = col4.selectbox("Device", devices)
        zero_shot_choice = zero_shot_form()
        recovery_choice = recovery_form()
        latency_choice = latency_form()
        submitted = st.button("Compress & evaluate", type="primary", key="evaluate_submit")
    if quick or device != "cpu":
        st.session_state.pop(PENDING, None)  # nothing long to confirm any more
    if not submitted:
        return
    budgets = form_budgets(new_methods, budgets_text)
    if budgets is None or not within_evaluation_cap(chosen, new_methods, budgets):
        return
    selected = unique_plans({c: plans[c] for c in chosen} | generated_plans(new_methods, budgets))
    zero_shot = zero_shot_options(*zero_shot_choice)
    recovery = recovery_options(*recovery_choice, list(datasets), bool(zero_shot))
    latency = latency_options(*latency_choice)
    if zero_shot is None or recovery is None or latency is None:
        return
    if not selected or not (datasets or zero_shot):
        st.error("Choose at least one plan and one dataset (or zero-shot task).")
        return
    protocol = eval_protocol_options(quick, int(windows), int(seq_len))
    task = partial(pipeline.evaluate_and_store, profile=profile, run=Run(cache_dir=common.cache_dir(), device=device),
                   params=common.error_model_params(profile), decomposition=factorise_with or None,
                   datasets=list(datasets), protocol=EvalProtocol(**protocol), **zero_shot, **recovery, **latency)
    estimate = cpu_estimate(list(datasets), protocol, len(selected)) if device == "cpu" else None
    request = {"task": task, "items": list(selected.values()), "estimate": estimate, "zero_shot": bool(zero_shot)}
    if device == "cpu" and not quick:
        st.session_state[PENDING] = request  # confirm_reference_run asks first
        return
    start_evaluation(request)


def no_plan_hint() -> None:
    """Where plans come from, when there is none to pick: a link to Allocate."""
    st.info("**No plan to pick yet.** Keep one on the Allocate page (it then shows here as “current”), save it to "
            "the cache or upload one there; or have new plans made below (“…and/or new plans of”).",
            icon=":material/info:")
    st.page_link("app_pages/allocate.py", label="Go to Allocate", icon=":material/tactic:")


def cpu_estimate(datasets: list[str], protocol: dict, plans: int) -> EvalEstimate:
    """The perplexity time estimate of this request on a CPU, for the current profile's model size."""
    hidden = next((l.in_features for l in profile.layers if l.kind == "q"), 0)
    return estimate_eval(datasets, protocol["seq_len"], protocol["max_windows"], profile.total_params, hidden,
                         profile.num_blocks, plans)


def estimate_text(estimate: EvalEstimate, zero_shot: bool) -> str:
    """The estimate in words, with what it rests on: it is a guess from the demo model's timing, not a measurement."""
    low, high = estimate.low + estimate.setup, estimate.high + estimate.setup
    span = format_seconds(low) if format_seconds(low) == format_seconds(high) else \
        f"{format_seconds(low)} to {format_seconds(high)}"
    per_window = estimate.seconds_per_window
    return (f"Estimated {span}: about {estimate.windows} perplexity windows at about "
            f"{format_seconds(per_window) if per_window >= 10 else f'{per_window:.2g} s'} each (the longer end when "
            "the dense model's perplexity is "
            f"not cached yet), plus about {format_seconds(estimate.setup)} to load the model and factorise its layers "
            "the first time" + (", plus the zero-shot tasks" if zero_shot else "") + ". This is an estimate, "
            "scaled by model size from the demo model's timing on a 2-core CPU; your machine may be faster or slower.")


def confirm_reference_run() -> None:
    """The pending reference-protocol CPU run: its estimate, then start it or go back."""
    request = st.session_state.get(PENDING)
    if request is None:
        return
    with st.container(border=True, key="confirm_reference"):
        st.warning("**The reference protocol on a CPU is a long run.** " + estimate_text(request["estimate"],
                   request["zero_shot"]) + " The Quick protocol takes minutes.", icon=":material/hourglass_top:")
        start, back = st.columns(2)
        if start.button("Start the reference run", key="confirm_reference_start", icon=":material/play_arrow:"):
            start_evaluation(st.session_state.pop(PENDING))
            st.rerun()
        if back.button("Back (change the settings)", key="confirm_reference_back"):
            st.session_state.pop(PENDING, None)
            st.rerun()


def start_evaluation(request: dict) -> None:
    """Submit the evaluation job (one at a time); its estimate shows until the job's progress allows one."""
    if common.job_registry().active("eval"):
        st.error("An evaluation is already running; wait for it or cancel it.")
        return
    estimate = request["estimate"]
    meta = {"kind": "eval"} | ({} if estimate is None else {"estimate_s": estimate.high + estimate.setup})
    items = request["items"]
    try:
        job = common.job_registry().submit(f"evaluate {len(items)} plan(s)", for_each, request["task"], items,
                                           meta=meta)
    except JobLimitError as exc:
        st.error(f"Evaluation not started: {exc}")
        return
    st.session_state[EVAL_JOB] = job.id


def zero_shot_form() -> tuple[bool, list[str], list[str], int]:
    """Zero-shot accuracy (lm-eval): on/off, hub tasks (the paper's eight), local YAMLs, doc cap (off: disabled).

    Local tasks are chosen from the YAMLs the server offers (the folder ``LEMS_TASKS_DIR``
    names), never typed: a client cannot name, or learn about, any other path.
    """
    on = st.toggle("Zero-shot accuracy (lm-eval)", value=False, key="zero_shot_on",
                   help="acc and acc_norm of the compressed and the dense model (dense cached per task), as the paper "
                        "(num_fewshot 0). Slow: the paper's eight tasks take hours on a CPU for the full sets.")
    z1, z2, z3 = st.columns([3, 2, 1])
    hub = z1.multiselect("Tasks", PAPER_TASKS, default=list(PAPER_TASKS), key="zero_shot_tasks", disabled=not on,
                         help="lm-eval tasks (default: the paper's eight); their data comes from the Hugging Face hub.")
    offered = list(offered_task_files())
    local = z2.multiselect("…and/or local task YAMLs", offered, key="zero_shot_local", disabled=not (offered and on),
                           help="Tasks in lm-eval's YAML format with local data (e.g. dataset_path: json + a jsonl), "
                                f"from the folder the server's {TASKS_DIR_ENV} names (none offered without it); "
                                "they run offline. Templates are plain field access only; !function is refused.")
    limit = z3.number_input("Docs per task (0 = all)", 0, 1_000_000, 0, step=100, key="zero_shot_limit",
                            disabled=not on,
                            help="Score at most this many documents per task (faster, noisier; 0 = the full set).")
    return on, hub, local, int(limit)


def zero_shot_options(on: bool, hub: list[str], local: list[str], limit: int) -> dict | None:
    """evaluate_plan's tasks / task_limit for the form's choice, {} when off, None (after st.error) when unusable.

    Names are looked up again in what the server offers, and each chosen YAML is validated
    (``check_task_yaml``) before a job is queued.
    """
    if not on:
        return {}
    offered = offered_task_files()
    unknown = [name for name in hub if name not in PAPER_TASKS] + [name for name in local if name not in offered]
    if unknown:
        st.error(f"Not an offered zero-shot task: {', '.join(map(str, unknown))}")
        return None
    paths = [str(offered[name]) for name in local]
    for name, path in zip(local, paths):
        try:
            check_task_yaml(path)
        except TaskYAMLError as exc:
            st.error(f"Task {name}: {str(exc).replace(path, name)}")
            return None
    tasks = [*hub, *paths]
    if not tasks:
        st.error("Zero-shot accuracy is on: choose at least one task.")
        return None
    return {"tasks": tasks, "task_limit": limit or None}


def recovery_form() -> tuple[bool, int, float, int]:
    """Recovery after compression (LoRA on the factors): on/off, steps, learning rate, seed (off: disabled)."""
    on = st.toggle("Recover with LoRA after compression", value=False, key="recovery_on",
                   help="Before measuring, fine-tune LoRA adapters on each plan's factors on the profile's "
                        "calibration text (never the evaluation text) and merge them; the ranks are unchanged. "
                        "The result is marked 'recovered'. Training takes time: about a second a step for the demo "
                        "model on a CPU.")
    r1, r2, r3 = st.columns(3)
    steps = r1.number_input("Recovery steps", 1, 100_000, RECOVERY_STEPS, step=10, key="recovery_steps",
                            disabled=not on, help="Optimiser steps of one 512-token window (or the calibration "
                                                  "window length) each; more heal more, slower.")
    lr = r2.number_input("Learning rate", 1e-7, 1.0, DEFAULT_LR["lora"], step=1e-5, format="%.1e",
                         key="recovery_lr", disabled=not on, help="Peak AdamW learning rate (warm-up, then cosine).")
    seed = r3.number_input("Recovery seed", 0, 2**31 - 1, 0, step=1, key="recovery_seed", disabled=not on,
                           help="Seeds the training windows and the adapters' initialisation.")
    return on, int(steps), float(lr), int(seed)


def recovery_options(on: bool, steps: int, lr: float, seed: int, datasets: list[str], zero_shot: bool) -> dict | None:
    """evaluate_plan's ``recovery`` for the form's choice: {} when off, None (after st.error) when unusable.

    The training text is the profile's calibration split; one that is an evaluation text
    of ``datasets`` is refused here, before a job is queued.
    """
    if not on:
        return {}
    if zero_shot:
        st.error("Recovery and zero-shot accuracy cannot run together: the zero-shot tasks would score the "
                 "unhealed model. Turn one of them off.")
        return None
    calibration = profile.calibration or {}
    try:
        dataset, split = str(calibration.get("dataset") or "wikitext2"), str(calibration.get("split") or "validation")
        check_not_evaluation_text(dataset, split, tuple(datasets))
        config = RecoveryConfig(steps=steps, lr=lr, seed=seed, dataset=dataset, split=split,
                                seq_len=min(512, int(calibration.get("seq_len") or 512)),
                                warmup_steps=min(10, steps // 10))
    except (RecoveryError, ValueError, TypeError) as exc:
        st.error(f"Recovery: {exc}")
        return None
    return {"recovery": config}


def latency_form() -> tuple[bool, int, int]:
    """Latency timing of the dense and the compressed model: on/off, prompt tokens, repeats (off: disabled)."""
    on = st.toggle("Measure prefill and decode latency (dense vs compressed)", value=False, key="latency_on",
                   help="After perplexity, time the dense and the compressed model in turns on the chosen device: one "
                        "prefill of the prompt tokens, and decode of a few tokens after them with the KV cache "
                        "(medians over the repeats). The result shows measured against predicted speedup. Costs about "
                        "2 x (repeats + 1) prefills and short decodes per plan: seconds for the demo model on a CPU, "
                        "longer for large models.")
    t1, t2 = st.columns(2)
    tokens = t1.number_input("Prompt tokens", 1, 32_768, PROMPT_TOKENS, step=64, key="latency_tokens",
                             disabled=not on, help="The prefill length and the decode KV cache (256: the prefill "
                                                   "device profile's).")
    repeats = t2.number_input("Timing repeats", 1, MAX_REPEATS, REPEATS, step=1, key="latency_repeats",
                              disabled=not on, help="Turns of each model; the medians are kept.")
    return on, int(tokens), int(repeats)


def latency_options(on: bool, tokens: int, repeats: int) -> dict | None:
    """evaluate_plan's ``latency`` for the form's choice: {} when off, None (after st.error) when unusable."""
    if not on:
        return {}
    try:
        return {"latency": TimingSettings(tokens=tokens, repeats=repeats)}
    except ModelTimingError as exc:
        st.error(f"Latency: {exc}")
        return None


def eval_protocol_options(quick: bool, windows: int, seq_len: int) -> dict:
    """evaluate_plan's max_windows / seq_len for the form's choice (quick overrides the other two)."""
    if quick:
        return {"max_windows": QUICK_EVAL.max_windows, "seq_len": QUICK_EVAL.seq_len}
    return {"max_windows": windows or None, "seq_len": seq_len}


@st.fragment(run_every=1)
def job_panel() -> None:
    """Progress and cancel of the running evaluation; one full rerun when it ends, to refresh the results."""
    state = common.show_job(EVAL_JOB, "evaluation", kind="eval")
    if state is None or not state.done:
        return
    common.rerun_app_once(state, EVAL_SEEN)
    if state.status == DONE:
        skipped = [r for r in state.result if "error" in r]
        st.success(f"Evaluated {len(state.result) - len(skipped)} plan(s) in {state.elapsed:.0f} s.")
        for r in skipped:
            st.warning(f"{tables.method_label(r['method'])} at {r['budget']:g}: "
                       f"{tables.failure_message(r['method'], r['error'])}")
    elif state.status == CANCELLED:
        st.caption("Plans evaluated before the cancel are stored.")


def results_section() -> None:
    """Stored and shipped results as a table, perplexity and accuracy vs realised ratio per method.

    The shipped ones (``cache/demo/results.json``: the measured demo study) are there on a
    fresh machine; an unreadable index or shipped file is reported and the rest still shown.
    """
    merged = ResultStore(common.cache_dir()).merged()
    for problem in merged.problems:  # the sidebar's cache problems list names the file / offers to set it aside
        st.error(problem)
    show_all = st.toggle("Results of all models", **common.bind("results_all", False))
    records = merged.records if show_all else [r for r in merged.records if r.get("fingerprint") == profile.fingerprint]
    if not records:
        st.info("No stored results for this model yet.")
        return
    shipped = sum(r.get("source") == SHIPPED for r in records)
    if shipped:
        st.caption(f"{shipped} of {len(records)} results are shipped with the demo (source 'shipped', read-only): "
                   + (shipped_note() or "measured by studies/ship_results.py").rstrip(". ") + ".")
    frame = tables.results_frame(records)
    if "protocol" in frame and (frame["protocol"] != "reference").any():
        st.caption("Rows whose protocol is not 'reference' (quick: 8 x 512 tokens; custom) are not comparable "
                   "with the paper's 2048-token, all-window numbers.")
    datasets = tables.ppl_datasets(frame)
    if datasets:
        dataset = st.radio("Dataset", datasets, horizontal=True, key="results_dataset")
        st.plotly_chart(figures.ppl_vs_ratio_figure(frame, dataset), key="ppl_ratio_fig")
    metrics = tables.zero_shot_metrics(frame)
    if metrics:
        metric = st.radio("Zero-shot accuracy", metrics, horizontal=True, key="results_zero_shot")
        st.plotly_chart(figures.accuracy_vs_ratio_figure(frame, metric), key="acc_ratio_fig")
    st.dataframe(frame, hide_index=True)
    latency_section(records)


def latency_section(records: list[dict]) -> None:
    """The measured prefill and decode latency of one timed result against the cost model's prediction."""
    timed = [r for r in reversed(records) if r.get("latency") is not None]  # newest first
    if not timed:
        return
    st.subheader("Latency: measured against predicted")
    labels = [f"{tables.method_label(str(r.get('method')))} @ {r.get('budget')} ({r.get('created', '')})"
              for r in timed]
    choice = st.selectbox("Timed result", range(len(timed)), format_func=labels.__getitem__, key="latency_result")
    try:
        timing = ModelTiming.from_dict(timed[choice]["latency"])
    except ModelTimingError as exc:
        st.error(f"This result's latency record is malformed: {exc}")
        return
    st.dataframe(pd.DataFrame(comparison_rows(timing)), hide_index=True, key="latency_table")
    load = "unknown" if timing.load_average is None else f"{timing.load_average:g}"
    st.caption(f"**Measured**: the whole model, dense against compressed, medians of {timing.repeats} turns on "
               f"{timing.device} with {timing.threads} thread(s), load average {load}. **Predicted**: the cost "
               "model's latency fraction of the compressible Linears only (attention, norms, embeddings and the "
               "lm_head are not in it), so the measured whole-model speedup is expected to be smaller; error % = "
               "(predicted − measured speedup) / measured speedup. The compressed model runs its factorised "
               "layers as two Linears (not the fused export).")


if common.is_synthetic():
    st.warning("The synthetic demo profile has no real model behind it: pick or build a real profile to evaluate.")
else:
    run_form(available_plans())
    confirm_reference_run()
    job_panel()
st.subheader("Results")
results_section()
