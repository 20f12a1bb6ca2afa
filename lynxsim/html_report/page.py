"""One self-contained HTML page: plotly's JavaScript inline once, then sections of tables, interactive figures
and text, with nothing fetched when the page is opened (no network, no CDN, no font), so that a page mailed or
archived beside a run shows the same thing anywhere.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import plotly.graph_objects as go
import plotly.io as pio

from lynxsim import __version__
from lynxsim.summary_columns import SummaryCells

FIGURE_HEIGHT_PX = 440
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
"""Zoom, pan, hover and the PNG download of plotly's mode bar, without its link to plotly's site."""

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
p.context { color: #555; margin-top: 0; }
table.summary { border-collapse: collapse; font-size: 0.9em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary caption { caption-side: bottom; text-align: left; color: #555; font-size: 0.85em; padding-top: 0.4em; }
div.figure { margin: 1em 0; }
pre.config { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class Section:
    """A heading and its body, already HTML."""

    heading: str
    body: str


def page(title: str, context: str, sections: list[Section]) -> str:
    """The whole document: ``title`` and ``context`` (a line about what the page is of), then the sections."""
    body = "\n".join(f"<h2>{html.escape(s.heading)}</h2>\n{s.body}" for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"context\">{html.escape(context)}</p>\n{body}\n"
        f"<p class=\"context\">written by lynxsim {html.escape(__version__)}</p>\n</body>\n</html>\n"
    )


class FigureWriter:
    """Figures as HTML ``div``s, the first with plotly's JavaScript inline (the page's only copy) and each with
    a fixed element id: the same records give the same page, byte for byte."""

    def __init__(self) -> None:
        self._written = 0

    def __call__(self, figure: go.Figure, name: str) -> str:
        figure.update_layout(template="plotly")
        if figure.layout.height is None:
            figure.update_layout(height=FIGURE_HEIGHT_PX)
        if figure.layout.margin.t is None:
            figure.update_layout(margin_t=90)
        div = pio.to_html(
            figure, include_plotlyjs=self._written == 0, full_html=False, div_id=f"figure-{name}",
            config=PLOTLY_CONFIG,
        )
        self._written += 1
        return f"<div class=\"figure\">{div}</div>"


def summary_table_html(cells: SummaryCells) -> str:
    """The summary table (``summary_columns.summary_cells``) as an HTML table with its legend as caption."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in cells.headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in cells.rows)
    return (f"<table class=\"summary\"><caption>{html.escape(cells.legend)}</caption>\n<thead><tr>{head}</tr>"
            f"</thead>\n<tbody>\n{rows}</tbody></table>")


def collapsible_text(summary: str, text: str) -> str:
    """``text`` (a file's content) preformatted under a ``details`` element, closed until clicked."""
    return f"<details><summary>{html.escape(summary)}</summary>\n<pre class=\"config\">{html.escape(text)}</pre>\n" \
           "</details>"


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"
