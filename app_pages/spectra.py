"""Spectra: singular values and residual-energy curves per layer, and a block x kind heatmap."""
import streamlit as st

from lems_core.model import KINDS
from app_pages import common, figures, tables
from app_pages.chart_view import show_chart

profile = common.current_profile()
st.title("Spectra")
st.caption(f"Singular values of the **{profile.decomposition}** matrices (whitened where the decomposition "
           "whitens). The residual energy 1 − E(r)/E is the *spectral shape* term of the LEMS error model.")

blocks = list(range(profile.num_blocks))
kinds = [k for k in KINDS if any(l.kind == k for l in profile.layers)]
col1, col2, col3 = st.columns([3, 3, 1])
chosen_blocks = col1.multiselect("Blocks", blocks, **common.bind("spec_blocks", tables.default_blocks(profile.num_blocks),
                                                                      allowed=blocks))
chosen_kinds = col2.multiselect("Kinds", kinds, **common.bind("spec_kinds", kinds, allowed=kinds))
power = col3.radio("Energy power", (2, 1), horizontal=True, **common.bind("spec_power", 2),
                   help="2 = energy σ² (reference 'energy2'), 1 = σ")
names = tables.select_layers(profile, chosen_blocks, chosen_kinds)

if not names:
    st.info("Pick at least one block and one kind.")
else:
    if len(names) > 60:
        st.caption(f"{len(names)} layers selected; narrow the selection for a readable plot.")
    left, right = st.columns(2)
    show_chart(figures.spectra_figure(profile, names), "spectra_fig", left)
    show_chart(figures.residual_energy_figure(profile, names, power, profile.ref_ratio), "residual_fig", right)

st.subheader("Energy kept, block x kind")
ratio = st.slider("Kept ratio c (rank = int(c · eq rank))", 0.05, 0.95, step=0.05,
                  **common.bind("spec_ratio", float(profile.ref_ratio)),
                  help=f"The profile's reference ratio is {profile.ref_ratio:g}.")
grid = tables.energy_kept_grid(profile, ratio, power)
show_chart(figures.heatmap_figure(grid, f"Energy kept E(r)/E at c = {ratio:g}", "kept", zrange=(0.0, 1.0)),
           "energy_grid_fig")
if not figures.heatmap_labelled(profile.num_blocks):
    st.caption("Hover a cell for its value: the cells of this many blocks are too small to label.")
