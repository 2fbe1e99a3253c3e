"""The Streamlit-aware part of core: the app frame (navigation, the shared sidebar, the URL)."""
