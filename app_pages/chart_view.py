"""How the pages put a Plotly figure on screen: with the app's compact template and ``theme=None``.

One helper so every chart speaks the same visual language (``figure_base.chart_template``
in the light or dark variant of the app's theme) and none carries Streamlit's or Plotly's
default template, several kB per chart that the Allocate page would resend on every
budget move.
"""
import plotly.graph_objects as go
import streamlit as st

from app_pages.figure_base import chart_template


def show_chart(fig: go.Figure, key: str, where=None) -> None:
    """Draw ``fig`` in ``where`` (a column or container; the page by default) under ``key``."""
    fig.layout.template = chart_template(dark=st.context.theme.type == "dark")
    (where or st).plotly_chart(fig, key=key, theme=None)
