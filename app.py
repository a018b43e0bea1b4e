"""LEMS Explorer: `streamlit run app.py`.

The entry point is only a router: it sets up the page, draws the shared sidebar
(profile picker + cache status) and runs the page chosen in st.navigation.
"""
import streamlit as st

from app_pages import common  # `streamlit run` puts this file's folder on sys.path

# An emoji favicon is drawn in the browser; a ":material/...:" one is fetched from a font CDN (fails offline).
# It is also the tab icon of every page: the pages' Material icons come from the bundled font.
st.set_page_config(page_title="LEMS Explorer", page_icon="🗜️", layout="wide")

PAGES = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/spectra.py", title="Spectra", icon=":material/show_chart:"),
    st.Page("app_pages/sensitivity.py", title="Sensitivity", icon=":material/tune:"),
    st.Page("app_pages/allocate.py", title="Allocate", icon=":material/tactic:"),
    st.Page("app_pages/compress.py", title="Compress & evaluate", icon=":material/speed:"),
    st.Page("app_pages/prediction.py", title="Predicted vs measured", icon=":material/query_stats:"),
]

common.keep_widget_state()
page = st.navigation(PAGES)
st.session_state[common.PAGE_KEY] = page.url_path  # common.bind re-seeds widgets drawn on a new page
common.sidebar()
page.run()
