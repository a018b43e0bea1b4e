"""Streamlit glue shared by app.py and the pages: cached resources, the current
profile, session-state keys and the shared sidebar. No computation lives here
(that is lems_core, drawn as tables by app_pages/tables.py and as Plotly figures by
app_pages/figures.py); this module only wires core calls to widgets.

Environment variables (used by the tests, handy for users):
    LEMS_CACHE_DIR    cache folder (read by lems_core.cache.default_cache_dir)
    LEMS_PROFILE_DIR  a profile folder to open by default (listed even outside the cache)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from lems_core.error_model import ErrorModelParams
from lems_core.jobs import CANCELLED, FAILED, JobRegistry, JobState
from lems_core.profile import Profile, ProfileError, synthetic_profile

SYNTHETIC = "synthetic"  # picker value of the synthetic demo profile
PROFILE_KEY = "profile_choice"
# Widget keys whose values must survive page switches (Streamlit drops the state of
# widgets that are not drawn in a run unless it is re-assigned every run).
PERSISTENT_KEYS = (
    PROFILE_KEY, "budget", "em_energy_power", "em_ref_ratio", "em_use_scale", "em_alpha", "em_gamma",
    "em_bias_form", "compare_methods", "plan_method",
)
EM_DEFAULTS = ErrorModelParams()


def keep_widget_state() -> None:
    """Re-assign persistent widget values so they survive navigating between pages."""
    for key in PERSISTENT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


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
    return f"{choice}@{(Path(choice) / 'profile.json').stat().st_mtime}"


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
    init_error_model_state(profile)
    ss = st.session_state
    use_scale = bool(ss.em_use_scale) and profile.kl_ref is not None
    return ErrorModelParams(
        energy_power=int(ss.em_energy_power), ref_ratio=float(profile.ref_ratio if use_scale else ss.em_ref_ratio),
        use_scale=use_scale, alpha=float(ss.em_alpha), gamma=float(ss.em_gamma), bias_form=str(ss.em_bias_form))


def init_error_model_state(profile: Profile) -> None:
    """Seed the error-model widget keys with the reference defaults (profile's reference ratio)."""
    defaults = {
        "em_energy_power": EM_DEFAULTS.energy_power, "em_ref_ratio": float(profile.ref_ratio),
        "em_use_scale": EM_DEFAULTS.use_scale and profile.kl_ref is not None, "em_alpha": EM_DEFAULTS.alpha,
        "em_gamma": EM_DEFAULTS.gamma, "em_bias_form": EM_DEFAULTS.bias_form,
    }
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)


def error_model_controls(profile: Profile) -> None:
    """Widgets for the shape (energy power, reference ratio), scale (on/off) and bias terms."""
    init_error_model_state(profile)
    shape, scale, bias = st.columns(3)
    with shape:
        st.markdown("**Shape** S_l: residual spectral energy")
        st.radio("Energy power", (2, 1), horizontal=True, key="em_energy_power",
                 help="2: energy Σσ² (reference 'energy2'); 1: Σσ")
        st.slider("Reference ratio", 0.05, 0.9, step=0.05, key="em_ref_ratio",
                  disabled=bool(st.session_state.em_use_scale) and profile.kl_ref is not None,
                  help="Where the shape is normalised to 1. With the scale on it is the profile's measurement "
                       f"point ({profile.ref_ratio:g}); turn the scale off to move it.")
    with scale:
        st.markdown("**Scale** KL_l: measured end-to-end KL")
        st.toggle("Use measured KL scale", key="em_use_scale", disabled=profile.kl_ref is None,
                  on_change=_follow_profile_ref_ratio, args=(float(profile.ref_ratio),),
                  help="Off: spectrum-only model (every layer equally important up to shape and bias).")
        if profile.kl_ref is None:
            st.caption("This profile has no KL measurements.")
    with bias:
        st.markdown("**Bias** β_b: depth multiplier")
        bias_controls()


def bias_controls() -> None:
    """Form, alpha and gamma of the depth bias (shared keys, so every page shows the same values)."""
    from lems_core.error_model import BIAS_FORMS

    st.selectbox("Bias form", BIAS_FORMS, key="em_bias_form",
                 help="harmonic = the reference's harmonicv2 (methods.md §1.2); constant disables the bias")
    st.slider("Bias α (concentration on early blocks)", 0.0, 3.0, step=0.1, key="em_alpha",
              help="Harmonic exponent: 0 = linear from 1+γ (first block) to 1 (last); larger α puts the extra "
                   "weight on the first few blocks.")
    st.slider("Bias γ (strength)", 0.0, 10.0, step=0.5, key="em_gamma",
              help="Errors in the first block weigh 1+γ times those in the last block.")


def _follow_profile_ref_ratio(ref_ratio: float) -> None:
    if st.session_state.em_use_scale:
        st.session_state.em_ref_ratio = ref_ratio


# ---------------------------------------------------------------------- jobs
def devices() -> list[str]:
    """Devices a job may run on: CUDA first when present."""
    import torch

    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def show_job(state_key: str, what: str) -> JobState | None:
    """Progress + cancel of the job whose id is in session_state[state_key], or its outcome
    when it ended badly (cancelled / failed, with the traceback). Call it from a
    ``st.fragment(run_every=1)``. Returns the job's snapshot (None when there is no job);
    a page shows its own success view when ``state.status == DONE``.
    """
    job = job_registry().get(st.session_state.get(state_key))
    if job is None:
        return None
    state = job.snapshot()
    if not state.done:
        st.progress(state.fraction, text=f"{state.name}: {state.message} ({state.elapsed:.0f} s)")
        st.button(f"Cancel {what}", on_click=job.cancel, key=f"cancel_{state_key}")
    elif state.status == CANCELLED:
        st.warning(f"{what.capitalize()} cancelled after {state.elapsed:.0f} s.")
    elif state.status == FAILED:
        st.error(f"{what.capitalize()} failed: {state.error}")
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
    from lems_core.results import ResultStore
    from app_pages.tables import cache_summary

    return cache_summary(Path(folder)) | {"results": len(ResultStore(folder).all())}


def _cache_status() -> None:
    summary = _cache_summary(str(cache_dir()))
    running = job_registry().active()
    with st.expander("Cache", expanded=False):
        st.caption(f"`{cache_dir()}`")
        st.caption(" · ".join(f"{k}: {v}" for k, v in summary.items()))
    if running:
        st.info(f"{len(running)} background job(s) running: " + ", ".join(j.name for j in running))
