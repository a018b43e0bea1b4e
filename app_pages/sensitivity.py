"""Sensitivity: the measured KL scale per layer, fitted error curves vs measured points, depth bias."""
import streamlit as st

from lems_core.model import KINDS
from app_pages import common, figures, tables
from app_pages.chart_view import show_chart

KL_FLOOR_NOTE = ("The KL floor is what the measurement reads with nothing compressed (the dense model against its own "
                 "reference logits as cached): a layer's KL near it is mostly that rounding, so layers under 3x the "
                 "floor cannot be ranked reliably. A floor of 0 means the cached reference is exact.")

profile = common.current_profile()
params = common.error_model_params(profile)
st.title("Sensitivity")
st.caption("LEMS error of layer l at kept ratio c: ε_l(c) = β_b(α,γ) · KL_l(ref) · S_l(c). "
           "**Scale** KL_l(ref): end-to-end KL with only that layer compressed to the reference ratio. "
           "**Shape** S_l: residual spectral energy, 1 at the reference rank. **Bias** β_b: depth multiplier.")

st.subheader("Scale: measured KL per layer")
if profile.kl_ref is None:
    st.info("This profile has no KL measurements; the error model falls back to shape × bias.")
else:
    show_chart(figures.kl_scale_figure(profile), "kl_scale_fig")
st.caption(tables.kl_floor_caption(profile) + " " + KL_FLOOR_NOTE)

st.subheader("Fitted error curves vs measured points")
ratios = tables.measured_ratios(profile)
st.caption("Lines: scale × shape for the current error model (no bias: each point is a single-layer "
           f"measurement). Crosses: measured KL at ratios {', '.join(f'{r:g}' for r in ratios) or '(none)'}."
           + ("" if len(ratios) > 1 else " Only the reference point is measured, so every line passes through "
              "its cross by construction; extra measured ratios test the shape."))
col1, col2 = st.columns(2)
blocks = col1.multiselect("Blocks", list(range(profile.num_blocks)),
                          **common.bind("sens_blocks", tables.default_blocks(profile.num_blocks),
                                       allowed=range(profile.num_blocks)))
kinds = col2.multiselect("Kinds", list(KINDS), **common.bind("sens_kinds", ["q", "down"], allowed=KINDS))
names = tables.select_layers(profile, blocks, kinds)
if names:
    show_chart(figures.error_curves_figure(profile, names, params), "error_curves_fig")
else:
    st.info("Pick at least one block and one kind.")

st.subheader("Bias: depth multiplier")
left, right = st.columns([1, 2])
with left:
    common.bias_controls(profile)
    st.button("Reset error model to defaults", key="em_reset_sensitivity", on_click=common.reset_error_model,
              args=(profile,), icon=":material/restart_alt:")
show_chart(figures.depth_bias_figure(profile.num_blocks, common.error_model_params(profile)), "depth_bias_fig",
           right)
