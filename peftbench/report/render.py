"""Writers' helpers: number formatting, and one report document rendered as GitHub Markdown, self-contained HTML,
a LaTeX booktabs table and JSON-safe records. Pure: strings in, strings out.

A document is a list of blocks::

    ("h", level, text)            heading
    ("p", text)                   paragraph (inline **bold**, `code` and [links](file) allowed; in HTML a link to
                                  a report file is an embedded download)
    ("list", [text, ...])         bullet list
    ("table", frame)              a DataFrame of display strings (sortable in HTML)
    ("img", path, png_bytes, alt) a figure: linked by path in Markdown, inlined as base64 in HTML

Example::

    >>> import pandas as pd
    >>> from peftbench.report.render import markdown
    >>> print(markdown([("h", 1, "Report"), ("table", pd.DataFrame({"arm": ["full"], "acc": ["85.0"]}))]))
    # Report
    <BLANKLINE>
    | arm | acc |
    |---|---|
    | full | 85.0 |
    <BLANKLINE>
"""

from __future__ import annotations

import base64
import html
import math
import re
from typing import Any

import numpy as np
import pandas as pd

NA = "n/a"

# --------------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------------


def missing(x: Any) -> bool:
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x)) or x is pd.NA


def pts(x: Any, digits: int = 2) -> str:
    """A fraction as points: 0.8531 → '85.31'."""
    return NA if missing(x) else f"{100.0 * float(x):.{digits}f}"


def num(x: Any, digits: int = 1) -> str:
    return NA if missing(x) else f"{float(x):,.{digits}f}"


def signed(x: Any, digits: int = 2) -> str:
    return NA if missing(x) else f"{float(x):+.{digits}f}".replace("-", "−")


def count(x: Any) -> str:
    return NA if missing(x) else f"{int(round(float(x))):,}"


def size(nbytes: Any) -> str:
    if missing(nbytes):
        return NA
    nbytes = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return NA


def mean_std(row: pd.Series, metric: str, with_ci: bool = True) -> str:
    """'85.31 ± 0.42 [84.90, 85.80]' (points); just the mean for one seed."""
    mean = row.get(metric)
    if missing(mean):
        return NA
    text = pts(mean)
    if not missing(row.get(f"{metric}_std")):
        text += f" ± {pts(row[f'{metric}_std'])}"
    if with_ci and not missing(row.get(f"{metric}_ci_low")):
        text += f" [{pts(row[f'{metric}_ci_low'])}, {pts(row[f'{metric}_ci_high'])}]"
    return text


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-safe dicts (NaN → None, numpy scalars → Python)."""
    out = []
    for row in frame.to_dict("records"):
        out.append({str(k): jsonable(v) for k, v in row.items()})
    return out


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [jsonable(x) for x in v.tolist()]
    if missing(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------


# Link targets the report may render as links: http(s) URLs and plain relative paths (its own files). Anything else
# (javascript:, data:, entity or backslash tricks) in study text, data or arm names stays text.
SAFE_HREF = r"(?:https?://[^\s()<>\\`]+|[\w.\-]+(?:/[\w.\-]+)*(?:#[\w\-]*)?)"


def safe_href(href: str) -> bool:
    return re.fullmatch(SAFE_HREF, href, flags=re.IGNORECASE) is not None


def defuse(text: str) -> str:
    """Markdown text in which only safe links stay links: outside `code` spans, a ``](`` not followed by a safe
    target, a ``]:`` (reference definition) and a ``<`` that could open raw HTML or an autolink are backslash-escaped
    (they still show as typed)."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        plain = re.sub(r"\]\((?!" + SAFE_HREF + r"\))", r"]\\(", parts[i], flags=re.IGNORECASE)
        plain = plain.replace("]:", "]\\:")
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", r"\\<", plain)
    return "".join(parts)


def _cell(x: Any) -> str:
    text = NA if missing(x) else str(x)
    # Texts are data: a review's "<br />" must show as text, not become HTML on GitHub; links only to safe targets.
    return defuse(text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ").replace("\r", " "))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of a frame's display values."""
    head = "| " + " | ".join(_cell(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule] + body)


LINK = r"\[([^\]]+)\]\(([^)\s]+)\)"


def is_relative(href: str) -> bool:
    """A link to a file beside the report (not an http(s) URL, not a data: URI)."""
    return re.match(r"(?:https?|data):", href, flags=re.IGNORECASE) is None


def unlink(text: str, present: set[str]) -> str:
    """Markdown text in which a relative link whose file (first path part) is not in ``present`` is its bare label:
    a link to a file the reader does not have is never rendered (outside `code` spans)."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(LINK, lambda m: m[1] if is_relative(m[2]) and m[2].split("/")[0].split("#")[0] not in present
                          else m[0], parts[i])
    return "".join(parts)


def markdown(blocks: list[tuple], present: set[str] | None = None) -> str:
    """The blocks as GitHub Markdown; with ``present`` (the names of the files beside report.md), relative links to
    other files are written as plain text."""
    def text(t: str) -> str:
        return defuse(t if present is None else unlink(t, present))

    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + text(block[2]))
        elif kind == "p":
            parts.append(text(block[1]))
        elif kind == "list":
            parts.append("\n".join(f"- {text(item)}" for item in block[1]))
        elif kind == "table":
            parts.append(markdown_table(block[1]) if len(block[1]) else "_(none)_")
        elif kind == "img":
            alt = block[3].replace("[", "\\[").replace("]", "\\]")
            parts.append(f"![{defuse(alt)}]({block[1]})")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# HTML (self-contained: inline CSS, base64 PNGs, a small inline table sorter; no network)
# --------------------------------------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
.wide { overflow-x: auto; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.85em; max-width: 100%; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; white-space: normal;
         overflow-wrap: break-word; }
td.long { min-width: 24em; }
td { white-space: nowrap; }
td.wrap, td.long, td.key { white-space: normal; }
th { background: #f6f8fa; cursor: pointer; }
th.key, td.key { position: sticky; right: 0; background: #fff8c5; font-weight: 600; box-shadow: -2px 0 3px #0002; }
th.asc::after { content: " ▲"; } th.desc::after { content: " ▼"; }
tr:nth-child(even) td { background: #fafbfc; }
tr:nth-child(even) td.key { background: #fff8c5; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f8fa; padding: 0 3px; border-radius: 3px; }
@media print {
  body { max-width: none; margin: 0; padding: 0; font-size: 9pt; }
  .wide { overflow: visible; }
  table { font-size: 6.5pt; width: 100%; }
  th, td { padding: 1px 3px; overflow-wrap: anywhere; }
  td.long { min-width: 0; }
  td { white-space: normal; }
  th.key, td.key { position: static; box-shadow: none; }
  th { cursor: auto; } th.asc::after, th.desc::after { content: ""; }
  tr, img { break-inside: avoid; }
}
"""

SORTER = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = !th.classList.contains("asc");
    table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(asc ? "asc" : "desc");
    function key(row) {
      var text = row.cells[col].textContent.trim();
      var v = parseFloat(text.replace(/,/g, "").replace(/\\u2212/g, "-").replace(/^[^0-9+\\-.]*/, ""));
      return isNaN(v) ? [1, text.toLowerCase()] : [0, v];
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      var c = x[0] - y[0] || (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


# Files embedded in report.html as data: URIs (downloads that work when the page is shared alone) up to this size;
# a larger one is named, not linked.
EMBED_MAX_BYTES = 2 * 1024 * 1024
MIME = {".csv": "text/csv", ".json": "application/json", ".md": "text/markdown", ".tex": "application/x-tex",
        ".png": "image/png", ".html": "text/html"}


def data_uri(name: str, data: bytes) -> str:
    mime = next((m for ext, m in MIME.items() if name.endswith(ext)), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def inline_html(text: str, files: dict[str, bytes] | None = None) -> str:
    """Escape, then turn Markdown inline `code`, **bold** and [text](href) into HTML (links: safe targets only). With
    ``files`` (name → bytes), a relative link to one of them becomes an embedded download (data: URI) and one to any
    other file its bare text: nothing in the page points at a file beside it."""
    out = html.escape(text, quote=True)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)

    def link(m: re.Match) -> str:
        href = html.unescape(m[2])
        if not safe_href(href):
            return m[0]
        if files is None or not is_relative(href):
            return f'<a href="{m[2]}">{m[1]}</a>'
        data = files.get(href)
        if data is None or len(data) > EMBED_MAX_BYTES:
            return m[1]
        name = html.escape(href.rsplit("/", 1)[-1], quote=True)
        return f'<a download="{name}" href="{data_uri(href, data)}">{m[1]}</a>'

    return re.sub(LINK, link, out)


def _td(value: Any, key: bool = False) -> str:
    text = NA if missing(value) else str(value)
    cls = "key" if key else "long" if len(text) > 40 else "wrap" if len(text) > 12 else ""
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


# Columns kept in view: sticky at the right edge when a table is wider than the page (and never cut in print).
KEY_COLUMNS = ("Verdict",)


def html_table(frame: pd.DataFrame) -> str:
    """A sortable table (click a header) in a horizontally scrolling box; headers and cells of more than 12
    characters wrap (on paper every cell may), long ones (texts, reasons) get a minimum width on screen; a
    :data:`KEY_COLUMNS` column stays in view."""
    keys = [str(c) in KEY_COLUMNS for c in frame.columns]
    head = "".join(f'<th class="key">{html.escape(str(c))}</th>' if k else f"<th>{html.escape(str(c))}</th>"
                   for c, k in zip(frame.columns, keys))
    rows = "".join("<tr>" + "".join(_td(v, k) for v, k in zip(row, keys)) + "</tr>"
                   for row in frame.itertuples(index=False))
    table = f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
    return f'<div class="wide">{table}</div>'


def html_page(blocks: list[tuple], title: str, files: dict[str, bytes] | None = None) -> str:
    """The blocks as one self-contained HTML page; ``files``: see :func:`inline_html`."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            level = min(block[1], 6)
            parts.append(f"<h{level}>{inline_html(block[2], files)}</h{level}>")
        elif kind == "p":
            parts.append(f"<p>{inline_html(block[1], files)}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{inline_html(i, files)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            parts.append(html_table(block[1]) if len(block[1]) else "<p><em>(none)</em></p>")
        elif kind == "img":
            data = base64.b64encode(block[2]).decode("ascii")
            parts.append(f'<img alt="{html.escape(block[3])}" src="data:image/png;base64,{data}">')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>{SORTER}</script>\n</body></html>\n")


# --------------------------------------------------------------------------------------------------------------------
# LaTeX
# --------------------------------------------------------------------------------------------------------------------

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex_table(table: pd.DataFrame, title: str = "") -> str:
    """The financial-sentiment notebook's booktabs table: Configuration, Params %, Accuracy, F1 (macro), Time —
    mean $\\pm$ std over seeds, in points. Needs ``\\usepackage{booktabs}``."""
    lines = [r"% peftbench report table; needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
             r"\begin{tabular}{lrrrr}", r"\toprule",
             r"Configuration & Params (\%) & Accuracy (\%) & F1 macro (\%) & Time (s) \\", r"\midrule"]

    def cell(row, m):
        if missing(row.get(m)):
            return NA
        text = pts(row[m])
        return text + (rf" $\pm$ {pts(row[f'{m}_std'])}" if not missing(row.get(f"{m}_std")) else "")

    for _, row in table.iterrows():
        config = tex_escape(row["arm"]) + (f" (n={int(row['seeds'])})" if row.get("seeds", 1) > 1 else "")
        share = NA if missing(row.get("params_trainable_pct")) else f"{row['params_trainable_pct']:.3g}"
        lines.append(f"{config} & {share} & {cell(row, 'accuracy')} & {cell(row, 'f1_macro')} & "
                     f"{num(row.get('train_time_s'))} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines.append(rf"\caption{{{tex_escape(title) + ': ' if title else ''}test scores in points, mean $\pm$ std over "
                 r"seeds; learning rate picked per configuration on validation.}")
    lines += [r"\label{tab:peftbench}", r"\end{table}"]
    return "\n".join(lines) + "\n"
