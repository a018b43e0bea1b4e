"""The app's Plotly figures, by one name: the pages and tests import ``figures`` and call any of them.

The figures themselves live by page family, each module built on ``figure_base``
(colours, legends, log axes, the compact chart template):

- ``figures_profile``: spectra, residual energy, sensitivity and predicted-vs-measured curves;
- ``figures_allocation``: the Allocate page's heatmaps, per-block lines and budget sweep;
- ``figures_results``: perplexity and zero-shot accuracy of measured results.

No streamlit in any of them: every function takes plain core objects and returns a
``plotly.graph_objects.Figure``, unit-tested in tests/test_figures.py.
"""
from app_pages.figure_base import (KIND_COLORS, LEGEND_RIGHT, METHOD_COLORS, REFERENCE_LINE, chart_template,
                                   log_axis, plain_figure)
from app_pages.figures_allocation import (block_views_figure, budget_sweep_figure, cell_text_color,
                                          error_by_block_figure, heatmap_figure, heatmap_labelled, per_block_figure,
                                          per_layer_figure, rank_heatmaps_figure)
from app_pages.figures_profile import (depth_bias_figure, error_curves_figure, kl_scale_figure, layer_fit_figure,
                                       prediction_scatter_figure, residual_energy_figure, spectra_figure)
from app_pages.figures_results import PPL_CEILING, accuracy_vs_ratio_figure, ppl_vs_ratio_figure

__all__ = ["KIND_COLORS", "LEGEND_RIGHT", "METHOD_COLORS", "PPL_CEILING", "REFERENCE_LINE", "accuracy_vs_ratio_figure",
           "block_views_figure", "budget_sweep_figure", "cell_text_color", "chart_template", "depth_bias_figure",
           "error_by_block_figure", "error_curves_figure", "heatmap_figure", "heatmap_labelled", "kl_scale_figure",
           "layer_fit_figure", "log_axis", "per_block_figure", "per_layer_figure", "plain_figure",
           "ppl_vs_ratio_figure", "prediction_scatter_figure", "rank_heatmaps_figure", "residual_energy_figure",
           "spectra_figure"]
