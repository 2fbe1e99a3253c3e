"""Circuit Explorer core: model loading, the activation store and pure analysis functions.

Nothing here imports streamlit except `core.session`.
"""
