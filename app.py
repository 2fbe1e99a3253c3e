"""Circuit Explorer: `streamlit run app.py`.

Navigation over pages/ and the sidebar shared by every page (model picker and prompt).
Each page starts with st.set_page_config(layout="wide") (see pages/attention.py for why).
"""
import streamlit as st

st.set_page_config(page_title="Circuit Explorer", page_icon="🔬", layout="wide")

PAGES = {
    "attention": st.Page("pages/attention.py", title="Attention", icon="👀", url_path="attention", default=True),
    "attribution": st.Page("pages/attribution.py", title="Logit attribution", icon="🎯", url_path="attribution"),
    "patching": st.Page("pages/patching.py", title="Head importance", icon="🧪", url_path="patching"),
    "saes": st.Page("pages/saes.py", title="SAE features", icon="🧩", url_path="saes"),
    "steering": st.Page("pages/steering.py", title="Steering", icon="🧭", url_path="steering"),
}

page = st.navigation(list(PAGES.values()))
requested = st.query_params.get("page")
if requested in PAGES and PAGES[requested] is not page and requested != page.url_path:
    st.switch_page(PAGES[requested], query_params=st.query_params.to_dict())
name = next((k for k, p in PAGES.items() if p is page or p.url_path == page.url_path), None)
if name:
    st.query_params["page"] = name
page.run()  # each page draws the shared sidebar, page links included (core/session.py)
