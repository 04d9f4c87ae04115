"""MkDocs hook: pages that need no network. Formulas are typeset and code is highlighted at build time.

Formulas: ``pymdownx.arithmatex`` (generic mode) leaves each formula as TeX in ``<span class="arithmatex">\\(...\\)</span>``
or ``<div class="arithmatex">\\[...\\]</div>``; this hook converts them with ``latex2mathml``. Browsers render
MathML natively, offline. A formula the converter cannot read fails the build, naming the page.

Code: ``pymdownx.highlight`` colours code blocks with Pygments; this hook writes the matching stylesheet,
a rule that lets a wide display formula scroll, and the layout rules of ``LAYOUT_CSS`` (the window's width, table
cells that wrap) into the built site (``css/offline.css``, listed in ``extra_css``).
"""

from __future__ import annotations

import html
import re

import os

from latex2mathml.converter import convert
from pygments.formatters import HtmlFormatter

#: The theme caps the text column at 800 px and keeps every table cell on one line, so at 1280 px a quarter of
#: the window stays empty while a table's last columns hide behind a scrollbar. Use the window's width (up to a
#: readable line length), and let table cells and long code lines wrap instead of scrolling out of sight.
LAYOUT_CSS = """
.wy-nav-content { max-width: 1200px; }
.wy-table-responsive table td, .wy-table-responsive table th,
.rst-content table.docutils thead, .rst-content table.docutils td, .rst-content table.docutils th {
    white-space: normal;
}
.rst-content table.docutils td, .rst-content table.docutils th { padding: 6px 10px; }
.rst-content img { max-width: 100%; height: auto; }
.rst-content pre, .rst-content pre code { white-space: pre-wrap; overflow-wrap: anywhere; }
"""

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_DISPLAY = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def _mathml(tex: str, display: str, where: str) -> str:
    source = html.unescape(tex).strip()
    try:
        return convert(source, display=display)
    except Exception as err:  # the converter raises many types; name the formula and the page
        raise ValueError(f"{where}: cannot typeset formula {source!r}: {err}") from err


def on_page_content(content: str, page, config, files) -> str:
    where = page.file.src_path
    content = _DISPLAY.sub(lambda m: f'<div class="math">{_mathml(m.group(1), "block", where)}</div>', content)
    return _INLINE.sub(lambda m: _mathml(m.group(1), "inline", where), content)


def on_post_build(config) -> None:
    folder = os.path.join(config["site_dir"], "css")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "offline.css"), "w", encoding="utf-8") as fh:
        fh.write(HtmlFormatter(style="default").get_style_defs(".highlight"))
        fh.write("\ndiv.math { overflow-x: auto; overflow-y: hidden; }\n")
        fh.write(LAYOUT_CSS)
