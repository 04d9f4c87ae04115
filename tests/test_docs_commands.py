"""Commands the README and docs give run on a fresh machine with empty caches, also when their processes start
together: ``benchmarks/method_comparison.py`` trains its rows in parallel processes, and each needs the float32
copy of the GGUF model that the first use writes."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# A build slow enough that both processes are inside build_once at once; it counts its runs and writes two
# files the way save_pretrained does (one after the other).
CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {benchmarks!r})
    from first_use import build_once

    def build(out):
        with open({log!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        with open(os.path.join(out, "model.safetensors"), "w") as fh:
            fh.write("weights")
        time.sleep(1.0)
        with open(os.path.join(out, "tokenizer.json"), "w") as fh:
            fh.write("tokenizer")

    while not os.path.exists({go!r}):  # start together, once both are up
        time.sleep(0.01)
    folder = build_once({cache!r}, build)
    # what a row does next: read the cache, which must be complete
    print(open(os.path.join(folder, "model.safetensors")).read(), open(os.path.join(folder, "tokenizer.json")).read())
""")


def _first_use():
    spec = importlib.util.spec_from_file_location("first_use_under_test", BENCHMARKS / "first_use.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_on_an_empty_cache_build_it_once_and_both_read_it(tmp_path):
    cache, log, go = tmp_path / "cache" / "model-f32", tmp_path / "builds.log", tmp_path / "go"
    code = CHILD.format(benchmarks=str(BENCHMARKS), log=str(log), go=str(go), cache=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.write_text("")
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["weights", "tokenizer"]
    assert len(log.read_text().split()) == 1, "the first-use work ran more than once"
    assert sorted(os.listdir(cache)) == ["model.safetensors", "tokenizer.json"]
    leftovers = [n for n in os.listdir(cache.parent) if n.endswith(".tmp")]
    assert not leftovers


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    first_use = _first_use()
    cache = tmp_path / "model-f32"

    def broken(out):
        (pathlib.Path(out) / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        first_use.build_once(str(cache), broken)
    assert not cache.exists()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    first_use.build_once(str(cache), lambda out: (pathlib.Path(out) / "model.safetensors").write_text("ok"))
    assert (cache / "model.safetensors").read_text() == "ok"
    first_use.build_once(str(cache), lambda out: pytest.fail("built again over a complete cache"))


def test_method_comparison_reads_its_model_through_build_once(monkeypatch):
    spec = importlib.util.spec_from_file_location("method_comparison_for_cache", BENCHMARKS / "method_comparison.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    calls = []

    class Stop(Exception):
        pass

    def record(folder, build):
        calls.append((folder, build))
        raise Stop

    monkeypatch.setattr(mc, "build_once", record)
    with pytest.raises(Stop):
        mc.load_base()
    assert calls == [(mc.CACHE, mc.dequantise_gguf)]


def _docs_build_block(path: pathlib.Path) -> str:
    text = path.read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "mkdocs build" in b]
    assert len(blocks) >= 1, f"{path.name} gives no docs build command"
    return blocks[-1]


def test_readme_and_docs_index_build_the_docs_with_the_same_commands():
    readme, index = _docs_build_block(ROOT / "README.md"), _docs_build_block(ROOT / "docs" / "index.md")
    assert readme == index
    assert readme.startswith("pip install -q torch==2.13.0 && ")  # torch first: the extras keep its build
