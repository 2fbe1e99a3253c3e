"""Presentation mode (issue 19) under AppTest: `?present=1` hides the sidebar and puts the view in
one caption line, charts are restyled copies (the figure passed in is never changed), and the
toggle and "Exit presentation" round-trip through the URL. In a real browser:
tests/test_presentation_browser.py."""
import json

import plotly.graph_objects as go
import torch
from streamlit.testing.v1 import AppTest

from core import plots
from core.ui import charts
from tests.helpers import open_app


def _styles(at) -> str:
    return "".join(el.proto.body for el in at.get("html"))


def _chart(at, key: str) -> dict:
    return json.loads(next(el for el in at.get("plotly_chart") if el.proto.id.endswith(key) or key in el.proto.id).proto.spec)


def test_present_figure_enlarges_a_copy_and_never_the_figure_passed_in():
    fig = plots.pattern_heatmap(torch.softmax(torch.randn(30, 30), -1), [f"t{i}" for i in range(30)], "L0H0 attention pattern")
    before = fig.to_dict()
    shown = charts.present_figure(fig)
    assert fig.to_dict() == before  # untouched (figures may be cached and shared between sessions)
    assert shown is not fig
    layout = shown.layout
    assert layout.xaxis.tickfont.size >= 16 and layout.yaxis.tickfont.size >= 16 and layout.title.font.size >= 24
    assert layout.height <= charts.MAX_HEIGHT < fig.layout.height
    assert shown.data[0].colorbar.tickfont.size >= 16


def _show_script():
    """A page that shows one figure in presentation mode and says whether it changed."""
    import plotly.graph_objects as go
    import streamlit as st

    from core.ui import charts

    st.session_state["present"] = True
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]), layout=dict(title="t", height=900, xaxis=dict(tickfont=dict(size=10))))
    before = fig.to_dict()
    charts.show(fig, key="one", width="stretch")
    st.write("unchanged" if fig.to_dict() == before else "CHANGED")


def test_show_in_presentation_mode_draws_a_styled_copy_and_leaves_the_figure_alone():
    at = AppTest.from_function(_show_script).run()
    assert not at.exception
    assert [m.value for m in at.markdown] == ["unchanged"]
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["layout"]["xaxis"]["tickfont"]["size"] >= 16 and spec["layout"]["height"] <= charts.MAX_HEIGHT
    assert [b.proto.label for b in at.get("download_button")] == ["PNG (2× pixels)", "SVG", "HTML (interactive, offline)"]


def test_present_in_the_url_hides_the_sidebar_and_round_trips():
    at = open_app(present="1")
    assert not at.exception
    # Hidden sidebar and chrome, the caption line, the way out, bigger chart fonts.
    assert charts.PRESENT_CSS in _styles(at)
    line = at.caption[0].value
    assert line.startswith("Model\\: ce\\-induction\\-2l · Prompt\\: “the green king")
    assert at.button(key="ce_exit_present").label == "Exit presentation"
    spec = _chart(at, "pattern_heatmap")
    assert spec["layout"]["xaxis"]["tickfont"]["size"] >= 16 and spec["layout"]["title"]["font"]["size"] >= 24
    assert spec["layout"]["height"] <= charts.MAX_HEIGHT
    assert at.query_params["present"] == ["1"] or at.query_params["present"] == "1"
    assert "Export this view" in [b.proto.label for b in at.get("download_button")]
    # Exit: the URL forgets it, the styles go.
    at.button(key="ce_exit_present").click().run()
    assert "present" not in at.query_params and at.session_state["present"] is False
    assert charts.PRESENT_CSS not in _styles(at)
    assert _chart(at, "pattern_heatmap")["layout"]["xaxis"]["tickfont"]["size"] == plots.FONT
    # The sidebar's toggle turns it back on, into the URL.
    at.toggle(key="present").set_value(True).run()
    assert str(at.query_params["present"]).strip("[]'") == "1" and charts.PRESENT_CSS in _styles(at)
    at.toggle(key="present").set_value(False).run()
    assert "present" not in at.query_params


def test_caption_line_is_one_line_of_plain_text():
    line = charts.caption_line({"model": "m", "prompt": "a\nb " + "x" * 300, "metric": "logit diff"})
    assert "\n" not in line and line.startswith("Model: m · Prompt: “a b ") and line.endswith("· Metric: logit diff")
    assert len(line) < 200


def test_charts_module_sets_no_global_plotly_template():
    import plotly.io as pio

    before = pio.templates.default
    charts.present_figure(go.Figure(go.Bar(y=[1])))
    assert pio.templates.default == before
