"""Report pages as data: sections return neutral blocks, two renderers write Markdown and HTML.

report.md and report.html (and compare.*, family.*) used to be two hand-written copies of each page
that drifted apart. Now a page is one list of blocks built once from the typed report; these two
renderers are the only code that knows Markdown or HTML syntax, so the two files of a page cannot
say different things. Text is data, never markup: emphasis, verdicts and links are inline parts, and
the HTML renderer escapes every string it is given.

The HTML page is self-contained (inline CSS, pictures embedded as base64 PNG) so it can be mailed or
opened from any copy of the directory, offline. The Markdown page links its pictures as files next
to it (`Image.file`, e.g. plots/stages.png); both pages show the same bytes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Literal

Tone = Literal["strong", "ok", "bad"]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Em:
    """Emphasis: `strong` is bold in both formats; `ok` / `bad` are verdicts, coloured in HTML and
    plain in Markdown (the word itself says it). `title` is HTML hover text (a failure's full error)."""

    text: str
    tone: Tone = "strong"
    title: str = ""


@dataclass(frozen=True)
class Link:
    """A link to another page; each format links its own file (report.md vs report.html) or, when
    that file does not exist (None), shows the text alone."""

    text: str
    md: str | None = None
    html: str | None = None


Inline = str | Em | Link
Cell = Inline | tuple[Inline, ...]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True, init=False)
class Paragraph:
    parts: tuple[Inline, ...]
    tone: Literal["", "bad"] = ""

    def __init__(self, *parts: Inline, tone: Literal["", "bad"] = "") -> None:
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "tone", tone)


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]


@dataclass(frozen=True)
class Image:
    """A picture at `file`, relative to the page. With `png` (drawn for this page) writing the
    Markdown page writes it there; without, the file was drawn before (a job's plots/)."""

    alt: str
    file: str
    png: bytes | None = None

    def read(self, page_dir: Path) -> bytes:
        return self.png if self.png is not None else (page_dir / self.file).read_bytes()


Block = Heading | Paragraph | Table | Image


def _parts(cell: Cell) -> tuple[Inline, ...]:
    return cell if isinstance(cell, tuple) else (cell,)


# ----------------------------------------------------------------------------- Markdown
def _md_inline(part: Inline) -> str:
    if isinstance(part, Em):
        return f"**{part.text}**" if part.tone == "strong" else part.text
    if isinstance(part, Link):
        return f"[{part.text}]({part.md})" if part.md else part.text
    return part


def _md_cell(cell: Cell) -> str:
    text = "".join(_md_inline(p) for p in _parts(cell))
    return text.replace("|", "\\|").replace("\n", " ")


def _one_line(text: str) -> str:
    """Control characters shown as escapes (a model path holding a newline broke the title)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def render_markdown(blocks: Iterable[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + _one_line(block.text), ""]
        elif isinstance(block, Paragraph):
            text = "".join(_md_inline(p) for p in block.parts)
            lines += [_CONTROL.sub(" ", text), ""]  # Markdown shows a newline as a space anyway
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            lines.append("|---" * len(block.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.alt}]({block.file})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_markdown(path: Path, blocks: list[Block]) -> Path:
    """The page at `path` and the pictures drawn for it at their `file` paths next to it."""
    for image in blocks:
        if isinstance(image, Image) and image.png is not None:
            target = path.parent / image.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image.png)
    path.write_text(render_markdown(blocks), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- HTML
_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
    ".ok{color:#187a2f;font-weight:bold}.bad{color:#b00020;font-weight:bold}img{max-width:100%}"
)


def _html_inline(part: Inline) -> str:
    if isinstance(part, Em):
        if part.tone == "strong":
            return f"<b>{escape(part.text)}</b>"
        title = f' title="{escape(part.title)}"' if part.title else ""
        return f'<span class="{part.tone}"{title}>{escape(part.text)}</span>'
    if isinstance(part, Link):
        text = escape(part.text)
        return f'<a href="{escape(part.html)}">{text}</a>' if part.html else text
    return escape(part)


def _html_block(block: Block, page_dir: Path) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        cls = f' class="{block.tone}"' if block.tone else ""
        return f"<p{cls}>" + "".join(_html_inline(p) for p in block.parts) + "</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{escape(h)}</th>" for h in block.headers)
        rows = "".join(
            "<tr>"
            + "".join("<td>" + "".join(map(_html_inline, _parts(c))) + "</td>" for c in row)
            + "</tr>"
            for row in block.rows
        )
        return f"<table><tr>{head}</tr>{rows}</table>"
    data = base64.b64encode(block.read(page_dir)).decode("ascii")
    return f'<p><img alt="{escape(block.alt)}" src="data:image/png;base64,{data}"></p>'


def render_html(blocks: list[Block], page_dir: Path) -> str:
    """One self-contained page (pictures without `png` read under `page_dir`); its title is the
    first level-1 heading."""
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1), "report")
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n"
        + "\n".join(_html_block(b, page_dir) for b in blocks)
        + "\n</body></html>\n"
    )


def write_html(path: Path, blocks: list[Block]) -> Path:
    path.write_text(render_html(blocks, path.parent), encoding="utf-8")
    return path


def page_link(page_dir: Path, run_dir: str | Path, text: str) -> Link:
    """A link from a page in `page_dir` to the job pages of `run_dir`, for those that exist."""

    def href(name: str) -> str | None:
        target = Path(run_dir) / name
        if not target.is_file():
            return None
        try:
            return str(target.relative_to(page_dir))
        except ValueError:
            return str(target)

    return Link(text, md=href("report.md"), html=href("report.html"))


# ----------------------------------------------------------------------------- number formats
def fmt_num(n: float | None, digits: int = 4) -> str:
    return "-" if n is None else f"{n:.{digits}f}"


def fmt_params(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
