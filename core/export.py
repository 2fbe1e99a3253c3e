"""Export a view: figures as PNG, SVG or self-contained HTML, and one HTML file for a whole page.

Pure (no Streamlit). Everything works offline:
- HTML files inline plotly.js (no CDN) and CircuitsVis's script (`plots.circuitsvis_attention_html`
  already inlines it); text from the user (a prompt may contain `<script>`) is HTML-escaped.
- PNG and SVG are drawn by kaleido, which drives a headless Chromium through choreographer. It is
  pointed at Debian's /usr/bin/chromium (or `$BROWSER_PATH`, or `$CHROMIUM_PATH`), never at a
  downloaded one, with MathJax off (its default is a CDN) and the plotly.js that ships with plotly.
  Starting the browser takes seconds, so it starts on the first image asked for and is then kept
  (one kaleido server per process, calls serialised by a lock).
"""
from __future__ import annotations

import html
import json
import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import plotly.graph_objects as go
import plotly.io as pio

DEFAULT_BROWSER = "/usr/bin/chromium"
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1200, 500

_lock = threading.Lock()
_started = False


class ExportError(RuntimeError):
    """An image could not be drawn (no browser, kaleido missing or failing): said to the user."""


def browser_path() -> str:
    """The Chromium kaleido drives: $BROWSER_PATH (choreographer's own variable), $CHROMIUM_PATH, or Debian's."""
    return os.environ.get("BROWSER_PATH") or os.environ.get("CHROMIUM_PATH") or DEFAULT_BROWSER


def figure_size(fig: go.Figure, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The size an image of `fig` gets: the asked-for one, else the figure's own, else 1200 × 500."""
    return int(width or fig.layout.width or DEFAULT_WIDTH), int(height or fig.layout.height or DEFAULT_HEIGHT)


def _kaleido():
    """The kaleido module, with its one sync server started (on first use)."""
    global _started
    try:
        import kaleido
    except ImportError as err:  # pragma: no cover - requirements.txt pins it
        raise ExportError("PNG and SVG export need kaleido (pip install -r requirements.txt).") from err
    if not _started:
        path = browser_path()
        if not Path(path).is_file():
            raise ExportError(f"PNG and SVG export need Chromium at {path} (apt-get install chromium, or set BROWSER_PATH).")
        import plotly

        plotlyjs = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"  # never kaleido's CDN fallback
        if not plotlyjs.is_file():
            raise ExportError(f"PNG and SVG export need plotly's own plotly.js ({plotlyjs}); reinstall plotly.")
        try:
            kaleido.start_sync_server(n=1, path=path, mathjax=False, plotlyjs=str(plotlyjs), silence_warnings=True)
        except Exception as err:  # noqa: BLE001 - choreographer's errors, a browser that will not start…
            raise ExportError(f"PNG and SVG export could not start Chromium ({path}): {err}") from err
        _started = True
    return kaleido


def _image(fig: go.Figure, fmt: str, width: int | None, height: int | None, scale: float) -> bytes:
    w, h = figure_size(fig, width, height)
    spec = fig.to_plotly_json()
    spec["layout"] = {**spec.get("layout", {}), "width": w, "height": h}
    with _lock:  # kaleido's sync server pairs each call with its answer by order: one call at a time
        k = _kaleido()
        try:
            return k.calc_fig_sync(spec, opts={"format": fmt, "width": w, "height": h, "scale": scale})
        except Exception as err:  # noqa: BLE001 - kaleido raises its own and choreographer's errors
            raise ExportError(f"Could not draw the {fmt.upper()}: {err}") from err


def figure_png(fig: go.Figure, width: int | None = None, height: int | None = None, scale: float = 2) -> bytes:
    """A PNG of `fig`, `width` × `height` CSS pixels (the figure's own size by default) times `scale`."""
    return _image(fig, "png", width, height, scale)


def figure_svg(fig: go.Figure, width: int | None = None, height: int | None = None, scale: float = 1) -> bytes:
    """An SVG of `fig`; its root element's width and height are `width` × `height`."""
    return _image(fig, "svg", width, height, scale)


def stop() -> None:
    """Stop kaleido's browser (tests; it is otherwise closed when the process exits)."""
    global _started
    with _lock:
        if _started:
            import kaleido

            kaleido.stop_sync_server(silence_warnings=True)
            _started = False


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def _plotly_js() -> str:
    """plotly.js itself, as an inline <script> (closing tags inside it cannot occur: it is minified JS)."""
    from plotly.offline import get_plotlyjs

    return f"<script>{get_plotlyjs()}</script>"


def _figure_div(fig: go.Figure, div_id: str) -> str:
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOTLY_CONFIG)


def _page(title: str, head: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"{head}\n</head>\n<body>\n{body}\n</body>\n</html>\n")


STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table.meta { border-collapse: collapse; margin-bottom: 1rem; }
table.meta th { text-align: left; padding: 0.2rem 1rem 0.2rem 0; vertical-align: top; color: #555; }
table.meta td { padding: 0.2rem 0; white-space: pre-wrap; font-family: monospace; }
.figure { margin: 1rem 0 2rem; }
</style>"""


def figure_html(fig: go.Figure, title: str | None = None) -> str:
    """One figure as a self-contained HTML page: plotly.js inlined, nothing loaded from a network."""
    text = title or _title(fig) or "Circuit Explorer figure"
    return _page(text, STYLE + _plotly_js(), f'<div class="figure">{_figure_div(fig, "figure-0")}</div>')


def circuitsvis_html(str_tokens: Sequence[str], patterns, head_names: Sequence[str], first: int = 0,
                     title: str = "CircuitsVis attention") -> str:
    """CircuitsVis's attention view as a self-contained HTML page (its script inlined, tokens as text)."""
    from core.plots import circuitsvis_attention_html

    return _page(title, STYLE, circuitsvis_attention_html(str_tokens, patterns, head_names, first=first))


def _title(fig: go.Figure) -> str:
    text = fig.layout.title.text if fig.layout.title is not None else None
    return html.unescape(text) if text else ""


def view_html(title: str, figures: Sequence[go.Figure], meta: Mapping[str, object], link: str | None = None) -> str:
    """A whole view in one self-contained HTML file: `meta` (model, prompt, metric, numbers) as
    escaped text, the link that reopens the view, then every figure (plotly.js inlined once)."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_text(v))}</td></tr>" for k, v in meta.items())
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if rows:
        parts.append(f'<table class="meta">{rows}</table>')
    if link:
        href = html.escape(link, quote=True) if link.startswith(("http://", "https://")) else ""
        parts.append(f'<p>Reopen this view: <a href="{href}">{html.escape(link)}</a></p>' if href
                     else f"<p>Reopen this view: {html.escape(link)}</p>")
    for i, fig in enumerate(figures):
        parts.append(f'<div class="figure">{_figure_div(fig, f"figure-{i}")}</div>')
    if not figures:
        parts.append("<p>This view has no charts.</p>")
    return _page(title, STYLE + _plotly_js(), "\n".join(parts))


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)
