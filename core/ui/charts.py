"""Every chart of every page goes through `show`: presentation mode and export.

Presentation mode (the sidebar's toggle, `?present=1` in the URL, kept by page links) hides the
sidebar and Streamlit's chrome, enlarges the page's text, draws each chart from a restyled COPY
of its figure (figures may be cached and shared between sessions: the one passed in is never
changed) with fonts a room can read and a height that fits a 16:9 screen, and puts the model,
prompt and metric in one caption line at the top. Its state is the session's (`st.session_state`),
never a process-wide plotly template.

Export: under each chart a small "Export" menu downloads it as PNG, SVG or HTML, each made only
when clicked (`st.download_button` with a callable: nothing is drawn on a rerun); at the bottom of
every page, "Export this view" downloads the page's charts, its model, prompt and metric and the
link that reopens it, as one self-contained HTML file (`core.export.view_html`).

Light on purpose (the frame imports it before torch loads): plotly and `core.export` are imported
when first needed.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import streamlit as st

PRESENT = "present"  # the toggle's session-state key and the URL parameter
TRUE_VALUES = ("1", "true", "yes", "on")

# Presentation sizes (px), for a 1280×720 projector.
TICK_FONT = 18
TEXT_FONT = 18
AXIS_TITLE_FONT = 18
TITLE_FONT = 26
CELL_FONT = 16  # numbers written in heatmap cells
MAX_HEIGHT = 420  # the tallest chart: below the caption line, the title and a row of controls it fits 720 px
MIN_TOP_MARGIN = 64  # room for a 26 px title

PRESENT_CSS = """<style>
[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], [data-testid="stExpandSidebarButton"],
[data-testid="stHeader"], [data-testid="stToolbar"], [data-testid="stDecoration"],
[data-testid="stAppDeployButton"], [data-testid="stMainMenu"] { display: none !important; }
[data-testid="stMainBlockContainer"] { padding: 0.75rem 1.5rem 2rem; max-width: 100%; }
[data-testid="stMainBlockContainer"] h1 { font-size: 2.4rem; padding-top: 0; padding-bottom: 0.25rem; }
[data-testid="stMainBlockContainer"] [data-testid="stMarkdownContainer"] p,
[data-testid="stMainBlockContainer"] [data-testid="stMarkdownContainer"] li { font-size: 1.2rem; }
[data-testid="stMainBlockContainer"] [data-testid="stCaptionContainer"],
[data-testid="stMainBlockContainer"] [data-testid="stCaptionContainer"] p { font-size: 1.05rem; }
[data-testid="stMainBlockContainer"] [data-testid="stWidgetLabel"] p { font-size: 1.1rem; }
.st-key-ce_present_caption { padding-right: 13rem; }
.st-key-ce_present_caption [data-testid="stCaptionContainer"] p { font-size: 1.05rem; white-space: nowrap;
    overflow: hidden; text-overflow: ellipsis; }
.st-key-ce_exit_box { position: fixed; top: 0.5rem; right: 1.25rem; z-index: 999990; width: auto !important; }
</style>"""


# ---------------------------------------------------------------------------------------------
# Presentation state (per browser session)
# ---------------------------------------------------------------------------------------------


def presenting() -> bool:
    """Whether this browser session is in presentation mode."""
    return bool(st.session_state.get(PRESENT, False))


def seed_from_url() -> None:
    """On a session's first run: presentation mode as the URL says (`?present=1`)."""
    st.session_state[PRESENT] = str(st.query_params.get(PRESENT, "")).lower() in TRUE_VALUES


def _exit() -> None:
    st.session_state[PRESENT] = False


def toggle() -> bool:
    """The sidebar's toggle; keeps `present=1` in the URL while it is on."""
    on = st.toggle("Presentation mode", key=PRESENT,
                   help="Hide the sidebar and the toolbar, enlarge text and charts for a projector; the link keeps it "
                   "(`?present=1`). Leave it with “Exit presentation” at the top of the page.")
    if on:
        if st.query_params.get(PRESENT) != "1":
            st.query_params[PRESENT] = "1"
    else:
        st.query_params.pop(PRESENT, None)
    return on


def draw_top() -> None:
    """At the top of the page in presentation mode: the styles, the caption line and the way out."""
    if not presenting():
        return
    st.html(PRESENT_CSS)
    with st.container(key="ce_exit_box", width="content"):  # fixed at the top right: visible after scrolling too
        st.button("Exit presentation", key="ce_exit_present", on_click=_exit, type="secondary", icon=":material/close:")
    _record().caption = st.container(key="ce_present_caption").empty()
    _fill_caption()


# ---------------------------------------------------------------------------------------------
# What this run showed (per script run: a thread-local, reset by the frame)
# ---------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    title: str = "Circuit Explorer"
    figures: dict = field(default_factory=dict)  # slot -> figure as shown, in drawing order
    meta: dict = field(default_factory=dict)  # model, prompt, metric, numbers
    caption: Any = None  # the caption line's placeholder, in presentation mode


_run = threading.local()


def begin_run(title: str | None = None) -> None:
    """Start a script run's record (the frame calls this before drawing anything)."""
    _run.record = RunRecord(title=title or "Circuit Explorer")


def _record() -> RunRecord:
    rec = getattr(_run, "record", None)
    if rec is None:
        rec = _run.record = RunRecord()
    return rec


def _md(text: str) -> str:
    """Text through Markdown as typed (as `state.md_escape`)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:])", r"\\\1", text)


def caption_line(meta: dict) -> str:
    """'Model: … · Prompt: “…” · Metric: …' (plain text; the prompt cut at 140 characters)."""
    parts = []
    if meta.get("model"):
        parts.append(f"Model: {meta['model']}")
    prompt = str(meta.get("prompt") or "").replace("\n", " ")
    if prompt:
        parts.append(f"Prompt: “{prompt if len(prompt) <= 140 else prompt[:139] + '…'}”")
    if meta.get("metric"):
        parts.append(f"Metric: {meta['metric']}")
    return " · ".join(parts)


def _fill_caption() -> None:
    rec = _record()
    if rec.caption is not None:
        line = caption_line(rec.meta)
        if line:
            rec.caption.caption(_md(line))
        else:
            rec.caption.empty()


def note_view(model: str | None = None, prompt: str | None = None, metric: str | None = None) -> None:
    """The view's model, prompt and metric: the caption line and the exported view show them."""
    meta = _record().meta
    for key, value in (("model", model), ("prompt", prompt), ("metric", metric)):
        if value:
            meta[key] = value
    _fill_caption()


def note_metric(metric: str) -> None:
    """The metric the page's charts show (when the page, not the task, decides it)."""
    note_view(metric=metric)


def note(name: str, value: object) -> None:
    """A number (or short text) the exported view lists beside the model and prompt."""
    _record().meta[name] = value


# ---------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------


def _bigger(font, size: int) -> dict:
    """A font of at least `size` px, keeping its other properties."""
    current = font.size if font is not None and font.size is not None else 0
    return {"size": max(size, current)}


def present_figure(fig):
    """A copy of `fig` styled for a projector: larger fonts, height capped to fit 720 px. `fig` is untouched."""
    import plotly.graph_objects as go

    out = go.Figure(fig.to_dict())  # to_dict is a deep copy
    layout = out.layout
    out.update_layout(font_size=max(TEXT_FONT, layout.font.size or 0), hoverlabel_font_size=TEXT_FONT,
                      legend_font_size=TEXT_FONT, title_font_size=TITLE_FONT)
    out.update_xaxes(tickfont_size=TICK_FONT, title_font_size=AXIS_TITLE_FONT, automargin=True)
    out.update_yaxes(tickfont_size=TICK_FONT, title_font_size=AXIS_TITLE_FONT, automargin=True)
    for trace in out.data:
        if "colorbar" in trace:
            trace.colorbar.tickfont = _bigger(trace.colorbar.tickfont, TICK_FONT)
            trace.colorbar.title.font = _bigger(trace.colorbar.title.font, TICK_FONT)
        if "textfont" in trace and trace.textfont is not None and trace.textfont.size:
            trace.textfont.size = max(CELL_FONT, trace.textfont.size)
    for ann in layout.annotations or ():
        ann.font = _bigger(ann.font, TEXT_FONT)
    height = layout.height or 450
    top = layout.margin.t if layout.margin.t is not None else 80
    if layout.title.text and top < MIN_TOP_MARGIN:
        out.update_layout(margin_t=MIN_TOP_MARGIN)
    out.update_layout(height=min(height, MAX_HEIGHT))
    return out


def show(fig, key: str | None = None, *, where=None, **kwargs):
    """Draw `fig` as `st.plotly_chart(fig, key=key, **kwargs)` would (same return value), in
    `where` (a column, a placeholder…) or the current container, with its Export menu below.

    In presentation mode the chart is a restyled copy (`present_figure`); the figure passed in is
    never changed. The figure as shown is recorded for "Export this view".
    """
    rec = _record()
    shown = present_figure(fig) if presenting() else fig
    slot = ("where", id(where)) if where is not None else ("key", key if key is not None else len(rec.figures))
    rec.figures.pop(slot, None)  # a placeholder redrawn (a live chart): keep its last figure, in order
    rec.figures[slot] = shown
    name = key if key is not None else f"chart_{len(rec.figures)}"
    box = where.container() if where is not None else st.container()
    with box:
        event = st.plotly_chart(shown, key=key, **kwargs)
        export_menu(shown, name)
    return event


def _title_text(fig) -> str:
    """The figure's title as plain text ('' when it has none)."""
    import html

    text = fig.layout.title.text if fig.layout.title is not None and fig.layout.title.text else ""
    return html.unescape(re.sub(r"<[^>]*>", " ", text)).strip()


def _file_stem(fig, fallback: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "_", _title_text(fig)).strip("_").lower()
    return (stem or fallback)[:60]


def _png(fig) -> bytes:
    from core import export

    return export.figure_png(fig, scale=2)


def _svg(fig) -> bytes:
    from core import export

    return export.figure_svg(fig)


def _html(fig) -> str:
    from core import export

    return export.figure_html(fig)


def export_menu(fig, name: str) -> None:
    """A small "Export" popover: PNG, SVG, HTML of `fig`, each made when its button is clicked."""
    stem = _file_stem(fig, name)
    with st.popover("Export", type="tertiary", icon=":material/download:", key=f"{name}__export"):
        st.download_button("PNG (2× pixels)", data=lambda: _png(fig), file_name=f"{stem}.png", mime="image/png",
                           key=f"{name}__png", on_click="ignore")
        st.download_button("SVG", data=lambda: _svg(fig), file_name=f"{stem}.svg", mime="image/svg+xml",
                           key=f"{name}__svg", on_click="ignore")
        st.download_button("HTML (interactive, offline)", data=lambda: _html(fig), file_name=f"{stem}.html",
                           mime="text/html", key=f"{name}__html", on_click="ignore")


# ---------------------------------------------------------------------------------------------
# The whole view
# ---------------------------------------------------------------------------------------------


def view_link() -> str:
    """The URL that reopens this view: the page's address with its query parameters."""
    base = st.context.url or ""
    params = urlencode(st.query_params.to_dict())
    return f"{base}?{params}" if params else base


def export_view_button() -> None:
    """At the bottom of the page: "Export this view" (every chart of this run, model, prompt, metric, link)."""
    rec = _record()
    figures, meta, title, link = list(rec.figures.values()), dict(rec.meta), rec.title, view_link()
    meta.setdefault("charts", " | ".join(_title_text(f) or "(untitled)" for f in figures) or "none")

    def build() -> str:
        from core import export

        return export.view_html(f"Circuit Explorer: {title}", figures, meta, link)

    stem = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "view"
    st.download_button("Export this view", data=build, file_name=f"circuit_explorer_{stem}.html", mime="text/html",
                       key="ce_export_view", on_click="ignore", icon=":material/download:",
                       help="One HTML file, offline: this page's charts, the model, prompt and metric, and the link "
                       "that reopens this view.")
