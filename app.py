"""Circuit Explorer: `streamlit run app.py`.

The frame around every page (core/ui/frame.py): navigation, the sidebar shared by every page
(model picker and prompt), the page's title; then the page itself, from pages/.
"""
import streamlit as st

st.set_page_config(page_title="Circuit Explorer", page_icon="🔬", layout="wide")

from core.ui import frame  # noqa: E402  (light: draws the frame before torch loads)

frame.run(frame.navigation())
