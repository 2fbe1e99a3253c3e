"""Circuit Explorer core: model loading, the activation store and pure analysis functions.

Nothing here imports streamlit except the `core.ui` package (the app's frame, state, widgets and
cache). `core/zoo/` holds the scripts that build `assets/`; nothing else in core imports them.
"""
