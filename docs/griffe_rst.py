"""Griffe extension for the API reference: render the reStructuredText bits of the docstrings.

The docstrings are Google style, but write formulas and cross-references the Sphinx way (``.. math::`` blocks,
``:math:`...```, ``:class:`~fourierft.PeftModel```...). Markdown would show those literally, and mangle the
formulas' underscores and braces. Before mkdocstrings renders a docstring this extension rewrites

* a ``.. math::`` directive and its indented body into a ``$$ ... $$`` block (typeset as MathML at build time through
  ``pymdownx.arithmatex``),
* the literal-block marker ``Example::`` into ``Example:`` (the indented block after it is a code block in
  Markdown already),
* ``:math:`x``` into ``$x$``,
* ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:``, ``:obj:`` roles into
  inline code (``~`` keeps only the last dotted component, as in Sphinx).

Only the rendered pages change; the source docstrings are untouched. Enabled in ``mkdocs.yml``
(``extensions: [docs/griffe_rst.py]`` of the python handler).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        prefix, i, body = match.group(1), i + 1, []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(prefix)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        depth = min((_indent(b) for b in body if b.strip()), default=0)
        if len(prefix) < 4:  # inside a reST list item: Markdown would not see a block there, so a display block
            prefix = ""
        out += ["", prefix + "$$"] + [prefix + b[depth:] for b in body if b.strip()] + [prefix + "$$", ""]
    return "\n".join(out)


def _literal_markers(text: str) -> str:
    """``Example::`` before an indented block (reST's literal-block marker) reads ``Example:``, as Sphinx shows it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.rstrip()
        if not stripped.endswith("::") or stripped.lstrip().startswith(".. "):
            continue
        following = next((x for x in lines[i + 1:] if x.strip()), None)
        if following is not None and _indent(following) > _indent(line):
            lines[i] = "" if stripped.strip() == "::" else stripped[:-1]
    return "\n".join(lines)


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with math directives, math roles and cross-reference roles rewritten."""
    text = _literal_markers(_math_blocks(text))
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(_role, text)


class RstMarkup(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`rst_to_markdown`."""

    def on_instance(self, *, node, obj: griffe.Object, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
