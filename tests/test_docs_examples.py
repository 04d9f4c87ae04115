"""The code shown to newcomers runs as written, offline: README's Quickstart and the docs' offline example.

Each block is taken from the Markdown file itself and run in a fresh folder; a ``# trainable params: ...``
comment in a block must equal what ``print_trainable_parameters`` prints there.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(path: str, heading: str) -> list[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        text = fh.read()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _run(code: str, folder) -> str:
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(cwd)
    return out.getvalue()


def _check_printed_counts(code: str, printed: str) -> None:
    promised = re.findall(r"# (trainable params: .*)", code)
    assert promised, "the block should show what print_trainable_parameters prints"
    for line in promised:
        assert line.strip() in printed, f"the docs say {line!r}, the code printed {printed!r}"


def test_readme_quickstart_runs_offline_as_written(tmp_path):
    (code,) = _python_blocks("README.md", "## Quickstart")
    printed = _run(code, tmp_path)
    _check_printed_counts(code, printed)
    assert sorted(os.listdir(tmp_path / "my-adapter")) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]


def test_docs_quickstart_offline_example_runs(tmp_path):
    (code,) = _python_blocks("docs/quickstart.md", "## A complete example that runs offline")
    _check_printed_counts(code, _run(code, tmp_path))
