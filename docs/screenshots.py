"""Screenshot every page of the docs' navigation in headless Chromium at 1280 px wide, full page height.

Build the site first, then run this from the repository root::

    python docs/figures/make_figures.py && mkdocs build --strict
    python docs/screenshots.py                 # -> screenshots/<page>.png (ignored by git)
    python docs/screenshots.py --width 1024 --out /tmp/shots --pages performance.md migrating.md

It serves ``site/`` on 127.0.0.1 (a free port), asks Chromium for each page's height (a small script is added to
the page as it is served, and ``--dump-dom`` reports it), then takes one screenshot of that height, or several
(``page-2.png``, ...) where a page is taller than Chromium's limit. Needs a
``chromium`` (Debian: ``apt-get install chromium``) or ``chromium-browser``/``google-chrome`` on the PATH, or
``--browser PATH``. Nothing is fetched from the network: the pages need none.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEASURE = b"<script>document.title = 'PAGE-HEIGHT=' + document.documentElement.scrollHeight;</script></body>"
MAX_HEIGHT = 16000  # Chromium's largest screenshot is about 16384 px


def nav_pages(config_file: pathlib.Path) -> list[str]:
    """The Markdown files of the navigation, in order (``mkdocs.yml``'s ``nav``)."""
    from mkdocs.config import load_config

    config = load_config(str(config_file))
    pages: list[str] = []

    def walk(items) -> None:
        for item in items:
            if isinstance(item, dict):
                for value in item.values():
                    walk(value if isinstance(value, list) else [value])
            elif isinstance(item, str) and item.endswith(".md"):
                pages.append(item)

    walk(config["nav"] or [])
    return pages


def page_url(page: str) -> str:
    """``quickstart.md`` -> ``quickstart/``; ``api/configs.md`` -> ``api/configs/``; ``index.md`` -> ``""``."""
    stem = page[:-3]
    if stem == "index":
        return ""
    return (stem[:-len("/index")] if stem.endswith("/index") else stem) + "/"


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; ``?measure`` adds the script that reports the page's height, ``?from=N`` a style that
    shows the page from ``N`` px down (Chromium cannot scroll before a screenshot)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        path, _, query = self.path.partition("?")
        if query != "measure" and not query.startswith("from="):
            return super().do_GET()
        self.path = path
        file = pathlib.Path(self.translate_path(self.path))
        if file.is_dir():
            file = file / "index.html"
        if not file.is_file():
            return self.send_error(404)
        body = file.read_bytes()
        if query == "measure":
            body = body.replace(b"</body>", MEASURE, 1)
        else:
            shift = f"<style>.wy-nav-content {{ margin-top: -{int(query[5:])}px; }}</style></head>"
            body = body.replace(b"</head>", shift.encode(), 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def browser_command(browser: str, profile: str) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}"]


def page_height(browser: str, profile: str, url: str, width: int) -> int:
    done = subprocess.run(browser_command(browser, profile) + [f"--window-size={width},1000", "--dump-dom",
                                                               url + "?measure"],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r"PAGE-HEIGHT=(\d+)", done.stdout)
    if not found:
        raise RuntimeError(f"no height for {url}: {done.stderr[-500:]}")
    return int(found.group(1))


def screenshot(browser: str, profile: str, url: str, out: pathlib.Path, width: int, height: int) -> None:
    subprocess.run(browser_command(browser, profile) + [f"--window-size={width},{height}", f"--screenshot={out}",
                                                        url], capture_output=True, text=True, timeout=180,
                   check=True)
    if not out.is_file():
        raise RuntimeError(f"no screenshot of {url}")


def find_browser(given: str | None) -> str:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome"]):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium (or pass --browser PATH)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=pathlib.Path, default=ROOT / "site", help="the built site (mkdocs build)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "screenshots")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--pages", nargs="*", help="Markdown pages to take (default: every page of the nav)")
    parser.add_argument("--browser", help="Chromium's executable")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        raise SystemExit(f"no site in {args.site}: run mkdocs build --strict first")
    browser = find_browser(args.browser)
    pages = args.pages or nav_pages(ROOT / "mkdocs.yml")
    args.out.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(args.site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with tempfile.TemporaryDirectory() as profile:
            for page in pages:
                url = base + page_url(page)
                height = page_height(browser, profile, url, args.width)
                name = page[:-3].replace("/", "_")
                parts = range(0, height, MAX_HEIGHT)  # a long page in parts: name.png, name-2.png, ...
                for i, top in enumerate(parts):
                    out = args.out / (f"{name}.png" if i == 0 else f"{name}-{i + 1}.png")
                    screenshot(browser, profile, url + (f"?from={top}" if top else ""), out, args.width,
                               min(height - top, MAX_HEIGHT))
                    print(f"{page}: {args.width} x {height} px, from {top} px -> {out}", flush=True)
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
