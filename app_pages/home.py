"""Home: what the current profile holds, and building a new profile in the background."""
import streamlit as st

from lems_core import pipeline
from lems_core.calibration import PRESETS, default_preset, preset as calibration_preset
from lems_core.decompositions import METHODS
from lems_core.jobs import DONE, JobLimitError
from lems_core.memory import MemoryBudgetError, parse_bytes
from lems_core.run import Run
from app_pages import common, tables

BUILD_JOB = "build_job_id"
PARAMS_COLUMN = st.column_config.NumberColumn(format="localized", help="Weights of the dense matrix, m·n.")
EQ_RANK_COLUMN = st.column_config.NumberColumn(
    help="Break-even rank ⌊m·n/(m+n)⌋: a rank-r factorisation stores r·(m+n) weights, so from this rank on it "
         "stores as many as the dense matrix and the layer is kept dense. Kept fractions are rank / eq rank.")
REF_RANK_HELP = "The rank at the profile's reference ratio, where each layer's KL was measured."
KL_SCALE_HELP = "End-to-end KL to the dense model with only this layer compressed to its reference rank."

st.title("LEMS Explorer")
st.caption("Low-rank SVD compression of LLMs: how many ranks each weight matrix gets under a global "
           "parameter budget, against baseline allocators. **LEMS** (Layer-wise Error Modeling Search) predicts "
           "each layer's error at every rank from its spectrum and a measured sensitivity, and picks the ranks "
           "with the smallest summed predicted error that fit the budget, exactly.")


def start_here() -> None:
    """Three steps for a first visit, each a link to its page: explore, allocate, evaluate."""
    with st.container(border=True, key="start_here"):
        st.markdown("**Start here**")
        steps = st.columns(3)
        steps[0].page_link("app_pages/spectra.py", label="1. Explore the spectra", icon=":material/show_chart:")
        steps[0].page_link("app_pages/sensitivity.py", label="…and the sensitivities", icon=":material/tune:")
        steps[0].caption("How fast each layer's spectrum decays, and how much the model minds each layer compressed.")
        steps[1].page_link("app_pages/allocate.py", label="2. Allocate ranks under a budget", icon=":material/tactic:")
        steps[1].caption("Move the budget and compare LEMS with the baselines; keep a plan, download or save it.")
        steps[2].page_link("app_pages/compress.py", label="3. Compress and evaluate", icon=":material/speed:")
        steps[2].caption("Factorise the model with the kept plan and measure perplexity; the quick protocol takes "
                         "minutes on a CPU.")


def show_profile_summary() -> None:
    """Headline metrics, the per-kind table and the full layer table of the current profile."""
    profile = common.current_profile()
    summary = tables.profile_summary(profile)
    st.subheader("Current profile")
    if common.is_synthetic():
        st.warning("This is a **synthetic demo** profile with made-up spectra; build a real one below.")
    st.markdown(f"**Model:** {summary['Model']}")  # in full: a metric cuts long names
    cols = st.columns(3)
    for col, label in zip(cols, ("Decomposition", "Blocks", "Compressible params")):
        col.metric(label, summary[label])
    st.caption(" · ".join(f"**{k}**: {v}" for k, v in summary.items()
                          if k not in ("Model", "Decomposition", "Blocks", "Compressible params")))
    with st.expander(f"Model card: {summary['Model']}", expanded=False, key="model_card"):
        st.markdown("\n".join(f"- **{k}**: {v}" for k, v in tables.model_card(profile).items()))
    if profile.calibration:
        st.caption("Calibration: " + ", ".join(f"{k}={v}" for k, v in profile.calibration.items()))
    st.markdown("**Layers by kind**")
    st.dataframe(tables.kind_table(profile), hide_index=True,
                 column_config={"share of params": st.column_config.ProgressColumn(min_value=0, max_value=1),
                                "params": PARAMS_COLUMN})
    with st.expander(f"All {len(profile.layers)} layers", expanded=False):
        st.dataframe(tables.layer_table(profile), hide_index=True, height=360,
                     column_config={"KL scale": st.column_config.NumberColumn(format="%.4g", help=KL_SCALE_HELP),
                                    "params": PARAMS_COLUMN, "eq rank": EQ_RANK_COLUMN,
                                    "ref rank": st.column_config.NumberColumn(help=REF_RANK_HELP)})



def build_form() -> None:
    """Form to build a profile from a model source; starts a background job."""
    device_options = common.devices()
    with st.form("build_profile"):
        source = st.text_input("Model source", value="demo",
                               help="`demo` (SmolLM2-135M GGUF), a Hugging Face hub id, a local folder or a .gguf file")
        col1, col2, col3 = st.columns(3)
        decomposition = col1.selectbox("Decomposition", METHODS, index=_index(METHODS, "kfac"))
        preset = col2.selectbox("Calibration preset", list(PRESETS),
                                index=_index(list(PRESETS), default_preset(device_options[0])),
                                format_func=lambda n: f"{n} ({PRESETS[n].n_samples}x{PRESETS[n].seq_len}, "
                                                      f"{PRESETS[n].n_search} search)")
        device = col3.selectbox("Device", device_options)
        budget = st.text_input("Memory budget", value="", placeholder="what the device has",
                               help="memory for statistics + decomposition, e.g. 24GB or 512MB; blocks are "
                                    "processed in windows that fit it (empty: what the device has free)")
        submitted = st.form_submit_button("Build profile", type="primary")
    if submitted:
        try:
            max_memory = parse_bytes(budget) if budget.strip() else None
        except MemoryBudgetError as exc:
            st.error(str(exc))
            return
        try:
            job = common.job_registry().submit(
                f"build {source} / {decomposition}", pipeline.build_profile_job, source, decomposition,
                calibration=calibration_preset(preset), run=Run(device=device, max_memory=max_memory),
                meta={"kind": "build"})
        except JobLimitError as exc:
            st.error(f"Profile build not started: {exc}")
            return
        st.session_state[BUILD_JOB] = job.id


@st.fragment(run_every=1)
def build_progress() -> None:
    """Polls the build job: progress bar and cancel, then the outcome."""
    state = common.show_job(BUILD_JOB, "build", kind="build")
    if state is None or not state.done:
        return
    if state.status == DONE:
        st.success(f"Profile built in {state.elapsed:.0f} s: `{state.result}`")
        if st.button("Open this profile", type="primary", key="open_built", on_click=_open_built,
                     args=(str(state.result),)):
            st.rerun()  # full rerun so the sidebar picker shows the new profile
    st.button("Dismiss", on_click=lambda: st.session_state.pop(BUILD_JOB, None), key="dismiss_build")


def _open_built(path: str) -> None:
    common.select_profile(path)
    st.session_state.pop(BUILD_JOB, None)


def _index(options, value) -> int:
    options = list(options)
    return options.index(value) if value in options else 0


start_here()
show_profile_summary()
st.divider()
st.subheader("Build a profile")
st.caption("Profiling loads the model, collects calibration statistics, decomposes every layer and measures one "
           "KL per layer. Small models take minutes on a CPU; results are cached.")
build_form()
build_progress()
