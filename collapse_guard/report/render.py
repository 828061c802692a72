"""The block list rendered as Markdown and as self-contained HTML."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from collapse_guard.report.common import (
    COLORS,
    SAMPLE_CHARS,
)


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", " ".join(str(text).split()))


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _sample(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:SAMPLE_CHARS] + ("..." if len(text) > SAMPLE_CHARS else "") if text else "(empty)"


def render_markdown(blocks: list[tuple]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in block[1]] + [""]
        elif kind == "verdicts":
            out += [f"- **{head}**" + (f" — {rest}." if rest else ".") for _, head, rest in block[1]] + [""]
        elif kind == "table":
            rows = block[1]
            out += ["| " + " | ".join(_md_cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows[1:]] + [""]
        elif kind == "samples":
            out += [f"- {label}: {_md_escape(_sample(text))}" for label, text in block[1]] + [""]
        elif kind == "img":
            out += [f"![{Path(block[1]).stem}]({Path(block[1]).name})", ""]
    return "\n".join(out)


def _html_inline(text: str) -> str:
    """Escaped text with `code` spans and **bold** rendered; no literal backtick survives."""
    escaped = html.escape(str(text))
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)
    return escaped.replace("`", "&#96;")


def _html_text(text: str) -> str:
    return html.escape(str(text)).replace("`", "&#96;")


def _data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(blocks: list[tuple], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_html_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_html_inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_html_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "verdicts":
            items = [f"<li style='color:{COLORS.get(level, '#000')}'><b>{_html_text(head)}</b>"
                     + (f" — {_html_text(rest)}." if rest else ".") + "</li>"
                     for level, head, rest in block[1]]
            body.append("<ul class='verdicts'>" + "".join(items) + "</ul>")
        elif kind == "table":
            rows = block[1]
            body.append("<table><tr>" + "".join(f"<th>{_html_text(c)}</th>" for c in rows[0]) + "</tr>")
            for row in rows[1:]:
                level = row[1] if len(row) > 1 and row[1] in COLORS else None
                style = f" style='color:{COLORS[level]}'" if level and level != "ok" else ""
                body.append(f"<tr{style}>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>")
            body.append("</table>")
        elif kind == "samples":
            body.append("<ul class='samples'>" + "".join(
                f"<li><b>{_html_text(label)}</b>: <q>{_html_text(_sample(text))}</q></li>"
                for label, text in block[1]) + "</ul>")
        elif kind == "img":
            body.append(f"<p><img alt='{_html_text(Path(block[1]).stem)}' src='{_data_uri(block[1])}' "
                        "style='max-width:100%'></p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right;vertical-align:top}th{background:#f4f4f4}td:nth-child(3){text-align:left}"
             "code{background:#f4f4f4;padding:0 3px}ul.samples{font-family:monospace;font-size:90%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_html_text(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
