"""Streamlit glue shared by app.py and the pages: cached resources, the current
profile, session-state keys and the shared sidebar. No computation lives here
(that is lems_core, drawn as tables by app_pages/tables.py and as Plotly figures by
app_pages/figures.py); this module only wires core calls to widgets.

Environment variables (used by the tests, handy for users):
    LEMS_CACHE_DIR    cache folder (read by lems_core.cache.default_cache_dir)
    LEMS_PROFILE_DIR  a profile folder to open by default (listed even outside the cache)
    LEMS_SHIPPED_RESULTS  the shipped results file (default cache/demo/results.json, lems_core.results)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from lems_core.error_model import ErrorModelParams
from lems_core.jobs import CANCELLED, FAILED, JobRegistry, JobState
from lems_core.profile import Profile, ProfileError, synthetic_profile

from app_pages.style import display_names_in

SYNTHETIC = "synthetic"  # picker value of the synthetic demo profile
PROFILE_KEY = "profile_choice"
# Widget keys re-assigned at the top of every run (the sidebar's profile picker, drawn
# on every page). The other controls keep their values through ``bind``.
PERSISTENT_KEYS = (PROFILE_KEY,)
EM_DEFAULTS = ErrorModelParams()
KEPT = "_kept_values"  # session_state[KEPT]: {control key: value}, never a widget key, never cleaned up
PAGE_KEY = "_current_page"  # set by app.py before the page runs
DRAWN_ON = "_drawn_on_page"  # {control key: page that last drew its widget}
EM_KEYS = ("em_energy_power", "em_ref_ratio", "em_use_scale", "em_alpha", "em_gamma", "em_bias_form")


def keep_widget_state() -> None:
    """Re-assign persistent widget values so they survive navigating between pages."""
    for key in PERSISTENT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def kept(key: str, default=None):
    """The remembered value of control ``key`` (``default`` until it is first set).

    Streamlit forgets a widget's state when a run does not draw it (another page, a
    collapsed fragment), and the browser may send defaults on return; the value kept
    here is a plain session-state entry that survives both.
    """
    store = st.session_state.setdefault(KEPT, {})
    if key not in store:
        store[key] = st.session_state[key] if key in st.session_state else default
    return store[key]


def set_kept(key: str, value) -> None:
    """Change a control's remembered value (from a callback or before its widget is drawn)."""
    st.session_state.setdefault(KEPT, {})[key] = value
    st.session_state[key] = value


def bind(key: str, default=None, on_change=None, args: tuple = (), allowed=None) -> dict:
    """Keyword arguments for a widget whose value must hold across pages and reruns.

    Seeds the widget from the kept value before it is drawn (so never pass ``value=``,
    ``index=`` or ``default=`` with it) and keeps the value when the user changes it;
    ``on_change(*args)`` runs after that. With ``allowed`` (the widget's options), a kept
    value that is no longer an option (another profile) is dropped from a list, or falls
    back to ``default``.
    """
    value = kept(key, default)
    if allowed is not None:
        allowed = list(allowed)
        value = [v for v in value if v in allowed] if isinstance(value, list) else (
            value if value in allowed else default)
        st.session_state[KEPT][key] = value
    # Assign when the widget is drawn anew (another page drew it last: the widget there is a different
    # one), lost its state, or disagrees; not on every rerun, because an assignment makes Streamlit push
    # the value to the browser, which would clobber keypresses still in flight (a slider held down).
    page, drawn = st.session_state.get(PAGE_KEY), st.session_state.setdefault(DRAWN_ON, {})
    if key not in st.session_state or st.session_state[key] != value or drawn.get(key) != page:
        st.session_state[key] = value
    drawn[key] = page
    return {"key": key, "on_change": _remember, "args": (key, on_change, tuple(args))}


def _remember(key: str, then=None, args: tuple = ()) -> None:
    st.session_state.setdefault(KEPT, {})[key] = st.session_state[key]
    if then is not None:
        then(*args)


@st.cache_resource
def job_registry() -> JobRegistry:
    """One registry of background jobs for the whole server (all sessions)."""
    return JobRegistry()


@st.cache_resource(max_entries=8, show_spinner="Loading profile…")
def _load_profile(path: str, mtime: float) -> Profile:
    """Profiles are read-only once loaded; keyed by path and modification time."""
    return Profile.load(path)


@st.cache_resource
def _synthetic() -> Profile:
    return synthetic_profile()


def cache_dir() -> Path:
    from lems_core.cache import default_cache_dir

    return default_cache_dir()


@dataclass(frozen=True)
class ProfileChoice:
    """One entry of the sidebar's profile picker."""

    value: str  # folder path, or SYNTHETIC
    label: str
    is_demo: bool = False
    decomposition: str = ""


def profile_choices() -> list[ProfileChoice]:
    """The $LEMS_PROFILE_DIR folder first, then the cache and the committed demo
    profiles; the synthetic demo only when there is no profile at all."""
    from lems_core.cache import list_profiles

    choices = []
    env_dir = _env_profile_dir()
    if env_dir:
        choices.append(ProfileChoice(env_dir, f"{Path(env_dir).name} (LEMS_PROFILE_DIR)"))
    for entry in list_profiles(cache_dir()):
        if str(entry.path) not in {c.value for c in choices}:
            choices.append(ProfileChoice(str(entry.path), entry.label, entry.is_demo, entry.decomposition))
    return choices or [ProfileChoice(SYNTHETIC, "synthetic demo (no profile found)")]


def default_choice(choices: list[ProfileChoice]) -> str:
    """The $LEMS_PROFILE_DIR folder, else a demo profile (KFAC-SVD first), else the first entry."""
    env_dir = _env_profile_dir()
    if env_dir:
        return env_dir
    demos = [c for c in choices if c.is_demo]
    kfac = [c for c in demos if c.decomposition == "kfac"]
    return (kfac or demos or choices)[0].value


def _env_profile_dir() -> str | None:
    """$LEMS_PROFILE_DIR when it names a profile folder."""
    folder = os.environ.get("LEMS_PROFILE_DIR")
    return str(Path(folder)) if folder and (Path(folder) / "profile.json").is_file() else None


def select_profile(path: str) -> None:
    """Make ``path`` the current profile (e.g. after building one)."""
    st.session_state[PROFILE_KEY] = str(path)


def current_profile_id() -> str:
    """Cache key of the current profile: its path and mtime, or SYNTHETIC."""
    choice = st.session_state.get(PROFILE_KEY, SYNTHETIC)
    if choice == SYNTHETIC:
        return SYNTHETIC
    try:
        return f"{choice}@{(Path(choice) / 'profile.json').stat().st_mtime}"
    except OSError:  # removed or set aside meanwhile: current_profile() reports it
        return f"{choice}@missing"


def current_profile() -> Profile:
    """The profile picked in the sidebar; stops the page with the error when it cannot be read."""
    choice = st.session_state.get(PROFILE_KEY, SYNTHETIC)
    if choice == SYNTHETIC:
        return _synthetic()
    try:
        return _load_profile(choice, (Path(choice) / "profile.json").stat().st_mtime)
    except (ProfileError, OSError) as exc:
        st.error(f"Could not load the profile at {choice}: {exc}")
        st.stop()


def is_synthetic() -> bool:
    return st.session_state.get(PROFILE_KEY, SYNTHETIC) == SYNTHETIC


def error_model_params(profile: Profile) -> ErrorModelParams:
    """The error-model settings chosen on the Allocate/Sensitivity pages (defaults until touched).

    The scale is only used when the profile has KL measurements, and then the shape must be
    normalised where they were measured, so the reference ratio follows the profile.
    """
    defaults = error_model_defaults(profile)
    v = {key: kept(key, defaults[key]) for key in EM_KEYS}
    use_scale = bool(v["em_use_scale"]) and profile.kl_ref is not None
    return ErrorModelParams(
        energy_power=int(v["em_energy_power"]), ref_ratio=float(profile.ref_ratio if use_scale else v["em_ref_ratio"]),
        use_scale=use_scale, alpha=float(v["em_alpha"]), gamma=float(v["em_gamma"]), bias_form=str(v["em_bias_form"]))


FIT_BUDGET = 0.8  # the app's default budget: the bias controls start from the profile's fit nearest to it


def error_model_defaults(profile: Profile) -> dict:
    """The error-model controls' defaults: the reference's settings at the profile's reference ratio,
    with the depth bias the profile fitted (the reference LEMS always fits it) when it has one."""
    from lems_core.allocators import fitted_params

    found = fitted_params(profile, FIT_BUDGET)
    bias = found[0] if found is not None else EM_DEFAULTS
    return {
        "em_energy_power": EM_DEFAULTS.energy_power, "em_ref_ratio": float(profile.ref_ratio),
        "em_use_scale": EM_DEFAULTS.use_scale and profile.kl_ref is not None, "em_alpha": float(bias.alpha),
        "em_gamma": float(bias.gamma), "em_bias_form": bias.bias_form,
    }


def bias_fit_caption(profile: Profile) -> str:
    """Where the bias controls' defaults come from."""
    from lems_core.allocators import fitted_params

    found = fitted_params(profile, FIT_BUDGET)
    if found is None:
        return "This profile has no bias fit: the defaults are the fixed α=0, γ=5 (LEMS with a fixed bias)."
    params, at = found
    return (f"Defaults: the profile's bias fit at {at:g} (10 seeded trials scored by KL, as the reference LEMS): "
            f"α={params.alpha:.3f}, γ={params.gamma:.3f}.")


def init_error_model_state(profile: Profile) -> None:
    """Seed the kept error-model values with the reference defaults (profile's reference ratio)."""
    for key, value in error_model_defaults(profile).items():
        kept(key, value)


def reset_error_model(profile: Profile) -> None:
    """Back to the reference defaults (a button's on_click: runs before the widgets are drawn)."""
    for key, value in error_model_defaults(profile).items():
        set_kept(key, value)


def error_model_controls(profile: Profile) -> None:
    """Widgets for the shape (energy power, reference ratio), scale (on/off) and bias terms."""
    defaults = error_model_defaults(profile)
    shape, scale, bias = st.columns(3)
    with shape:
        st.markdown("**Shape** S_l: residual spectral energy")
        st.radio("Energy power", (2, 1), horizontal=True, **bind("em_energy_power", defaults["em_energy_power"]),
                 help="2: energy Σσ² (reference 'energy2'); 1: Σσ")
        st.slider("Reference ratio", 0.05, 0.9, step=0.05, **bind("em_ref_ratio", defaults["em_ref_ratio"]),
                  disabled=bool(kept("em_use_scale", defaults["em_use_scale"])) and profile.kl_ref is not None,
                  help="Where the shape is normalised to 1. With the scale on it is the profile's measurement "
                       f"point ({profile.ref_ratio:g}); turn the scale off to move it.")
    with scale:
        st.markdown("**Scale** KL_l: measured end-to-end KL")
        st.toggle("Use measured KL scale", disabled=profile.kl_ref is None,
                  **bind("em_use_scale", defaults["em_use_scale"], _follow_profile_ref_ratio, (float(profile.ref_ratio),)),
                  help="Off: spectrum-only model (every layer equally important up to shape and bias).")
        if profile.kl_ref is None:
            st.caption("This profile has no KL measurements.")
    with bias:
        st.markdown("**Bias** β_b: depth multiplier")
        bias_controls(profile)
    st.button("Reset error model to defaults", key="em_reset", on_click=reset_error_model, args=(profile,),
              icon=":material/restart_alt:",
              help="Energy power 2, measured KL scale at the profile's reference ratio, and the profile's fitted "
                   "harmonic bias (α=0, γ=5 when it has no fit).")


def bias_controls(profile: Profile | None = None) -> None:
    """Form, alpha and gamma of the depth bias (kept values, so every page shows the same ones);
    they start from the profile's fitted bias when it has one."""
    from lems_core.error_model import BIAS_FORMS

    d = error_model_defaults(profile) if profile is not None else {
        "em_bias_form": EM_DEFAULTS.bias_form, "em_alpha": EM_DEFAULTS.alpha, "em_gamma": EM_DEFAULTS.gamma}
    st.selectbox("Bias form", BIAS_FORMS, **bind("em_bias_form", d["em_bias_form"]),
                 help="harmonic = the reference's harmonicv2 (docs/reference/methods.md §1.2); constant disables "
                      "the bias")
    st.slider("Bias α (concentration on early blocks)", 0.0, 3.0, step=0.01, **bind("em_alpha", d["em_alpha"]),
              help="Harmonic exponent: 0 = linear from 1+γ (first block) to 1 (last); larger α puts the extra "
                   "weight on the first few blocks.")
    st.slider("Bias γ (strength)", 0.0, 10.0, step=0.01, **bind("em_gamma", d["em_gamma"]),
              help="Errors in the first block weigh 1+γ times those in the last block.")
    if profile is not None:
        st.caption(bias_fit_caption(profile))


def _follow_profile_ref_ratio(ref_ratio: float) -> None:
    if st.session_state.em_use_scale:
        set_kept("em_ref_ratio", ref_ratio)


# ---------------------------------------------------------------------- jobs
def devices() -> list[str]:
    """Devices a job may run on: CUDA first when present."""
    import torch

    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def show_job(state_key: str, what: str, kind: str | None = None) -> JobState | None:
    """Progress + cancel of the job whose id is in session_state[state_key], or its outcome
    when it ended badly (cancelled / failed, with the traceback). Call it from a
    ``st.fragment(run_every=1)``. Returns the job's snapshot (None when there is no job);
    a page shows its own success view when ``state.status == DONE``.

    Jobs belong to the server, not to a browser session: when this session has no job
    of ``kind`` (a reloaded page, a new tab) the newest running one is adopted, so its
    progress shows and it can be cancelled from here.
    """
    job = job_registry().get(st.session_state.get(state_key))
    if job is None and kind is not None:
        running = job_registry().active(kind)
        job = running[0] if running else None
        if job is not None:
            st.session_state[state_key] = job.id
    if job is None:
        return None
    state = job.snapshot()
    if not state.done:
        st.progress(state.fraction, text=f"{state.name}: {state.status_line}")  # message, elapsed, time left
        st.button(f"Cancel {what}", on_click=job.cancel, key=f"cancel_{state_key}")
    elif state.status == CANCELLED:
        st.warning(f"{what.capitalize()} cancelled after {state.elapsed:.0f} s.")
    elif state.status == FAILED:
        st.error(f"{what.capitalize()} failed: {display_names_in(str(state.error))}")
        with st.expander("Traceback"):
            st.code(state.traceback)
    return state


def rerun_app_once(state: JobState, seen_key: str) -> None:
    """One full rerun when a job has finished, so parts outside the polling fragment redraw."""
    if state.done and st.session_state.get(seen_key) != state.id:
        st.session_state[seen_key] = state.id
        st.rerun()


# ------------------------------------------------------------------- sidebar
def sidebar() -> None:
    """Profile picker and a small cache / jobs status, on every page."""
    with st.sidebar:
        choices = profile_choices()
        labels = {c.value: c.label for c in choices}
        if st.session_state.get(PROFILE_KEY) not in labels:
            st.session_state[PROFILE_KEY] = default_choice(choices)
        st.selectbox("Profile", list(labels), format_func=labels.get, key=PROFILE_KEY,
                     help="Spectra + sensitivities of one model under one decomposition (built on Home).")
        if is_synthetic():
            st.warning("No profile found: showing a **synthetic demo** profile (made-up spectra).")
        _cache_status()


@st.cache_data(ttl=20, show_spinner=False)
def _cache_summary(folder: str) -> dict:
    from lems_core.cache import CacheIndexError
    from lems_core.results import ResultsFileError, ResultStore, shipped_results
    from app_pages.tables import cache_summary

    try:
        results = len(ResultStore(folder).all())
    except CacheIndexError:
        results = "index unreadable"
    try:
        shipped = len(shipped_results())
    except ResultsFileError:
        shipped = "unreadable"
    return cache_summary(Path(folder)) | {"results": results} | ({"shipped results": shipped} if shipped else {})


def merged_results():
    """Stored + shipped results (``ResultStore.merged``), re-read only when the index or the shipped file changes.

    For pages that read them on every budget move (Allocate); the returned records are
    a copy per call.
    """
    folder = cache_dir()
    return _merged_results(str(folder), _results_stamp(folder))


def results_stamp() -> tuple:
    """What changes when the stored or shipped results do (a cache key for tables built from them)."""
    return _results_stamp(cache_dir())


@st.cache_data(max_entries=4, show_spinner=False)
def _merged_results(folder: str, stamp: tuple):
    from lems_core.results import ResultStore

    return ResultStore(folder).merged()


def _results_stamp(folder: Path) -> tuple:
    """Names and modification times of the index files and the shipped results file."""
    from lems_core.results import shipped_results_path

    return _mtimes(folder, "index/cache.db*") + (_file_stamp(shipped_results_path()),)


def _mtimes(folder: Path, pattern: str) -> tuple:
    out = []
    for p in sorted(folder.glob(pattern)):
        out.append((p.name, _file_stamp(p)))
    return tuple(out)


def _file_stamp(path: Path) -> tuple | None:
    try:
        stat = path.lstat()
    except OSError:
        return None
    return str(path), stat.st_size, stat.st_mtime_ns


@st.cache_data(max_entries=4, show_spinner=False)
def _cache_problems(folder: str, stamp: tuple) -> list:
    """health.cache_problems, recomputed only when ``stamp`` (what changed on disk) does."""
    from lems_core.health import cache_problems

    return cache_problems(Path(folder))


def _cache_stamp(folder: Path) -> tuple:
    """Cheap signature of the entries cache_problems reads: names and modification times (shipped results too)."""
    return tuple(_mtimes(folder, pattern) for pattern in ("profiles/*/profile.json", "profiles/*", "plans/*.json")) \
        + (_results_stamp(folder),)


def _remove_problem(problem) -> None:
    """Set one bad entry aside (health.remove_problem) and forget everything read from the cache."""
    from lems_core.health import remove_problem

    try:
        moved = remove_problem(problem, cache_dir())
    except OSError as exc:
        st.session_state["cache_problem_message"] = f"Could not remove {problem.path}: {exc}"
    else:
        st.session_state["cache_problem_message"] = (f"Moved {problem.path.name} to {moved}" if moved
                                                     else f"Deleted unreadable index row {problem.rowid}")
    st.cache_data.clear()
    _load_profile.clear()


def cache_problems_panel() -> None:
    """Every unreadable cache entry, with a button that sets just that one aside (sidebar, every page)."""
    problems = _cache_problems(str(cache_dir()), _cache_stamp(cache_dir()))
    message = st.session_state.pop("cache_problem_message", None)
    if message:
        st.success(message)
    if not problems:
        return
    with st.expander(f":material/warning: {len(problems)} unreadable cache entr{'y' if len(problems) == 1 else 'ies'}",
                     expanded=True):
        st.caption("These are skipped everywhere else. Removing one moves it to the cache's quarantine/ folder "
                   "(an undecodable index row is deleted); nothing else is touched.")
        for i, problem in enumerate(problems):
            st.markdown(f"**{problem.kind}** `{problem.path}`" + (f" row {problem.rowid}" if problem.rowid else ""))
            st.caption(problem.reason[:300])
            if problem.removable:
                st.button("Remove", key=f"remove_cache_problem_{i}", on_click=_remove_problem, args=(problem,))
            else:
                st.caption("Read-only (shipped with the demo): restore it from git, e.g. "
                           f"`git checkout -- {problem.path}`.")


def _cache_status() -> None:
    summary = _cache_summary(str(cache_dir()))
    running = job_registry().active()
    with st.expander("Cache", expanded=False):
        st.caption(f"`{cache_dir()}`")
        st.caption(" · ".join(f"{k}: {v}" for k, v in summary.items()))
    cache_problems_panel()
    if running:
        st.info(f"{len(running)} background job(s) running: " + ", ".join(j.name for j in running))
