"""The page in a headless browser: Debian's Chromium driven by playwright (the Python package; its own
browser downloads are never used). ``python -m moe_adapt.export.web bench FILE.gguf ...`` prints what
the page measures for each file; the browser tests launch Chromium the same way (:data:`ARGS`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moe_adapt.errors import MoEAdaptError
from moe_adapt.export.web import serving

__all__ = ["ARGS", "CHROMIUM", "chromium", "run_page"]

CHROMIUM = os.environ.get("MOE_ADAPT_CHROMIUM", "/usr/bin/chromium")
"""The browser executable: ``$MOE_ADAPT_CHROMIUM``, else Debian's ``chromium`` package."""

ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Chromium's switches: headless, CPU only, and no traffic of its own (updates, sync, QUIC)."""


@contextmanager
def chromium(executable: str = CHROMIUM) -> Iterator[Any]:
    """A headless Chromium (a playwright ``Browser``) for the block.

    Raises:
        MoEAdaptError: playwright or the browser is missing (one line saying what to install).
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise MoEAdaptError("the browser check needs playwright: pip install 'moe-adapt[web]'") from err
    if not Path(executable).is_file():
        raise MoEAdaptError(
            f"no Chromium at {executable}: apt-get install chromium, or set MOE_ADAPT_CHROMIUM"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=list(ARGS))
        try:
            yield browser
        finally:
            browser.close()


def run_page(
    browser: Any, url: str, query: str = "", wait_for: Sequence[str] = ("done",)
) -> tuple[Any, list[str]]:
    """Open the page at ``url + query`` and wait (up to 5 minutes) until its results' status is one of
    ``wait_for`` or ``error``; returns the page and every request it made outside ``url``."""
    page = browser.new_page()
    outside: list[str] = []
    local = (url, "blob:" + url.rstrip("/"), "data:")
    page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    page.goto(url + query)
    states = json.dumps([*wait_for, "error"])
    page.wait_for_function(
        f"() => {states}.includes(JSON.parse(document.getElementById('results').textContent).status)",
        timeout=300_000,
    )
    return page, outside


def results(page: Any) -> dict[str, Any]:
    """What the page measured (its ``<script id="results">`` JSON)."""
    return dict(json.loads(page.locator("#results").text_content()))


def bench(
    files: Sequence[str | Path], n: int = 64, letters: bool = False, threads: int | None = None
) -> None:
    """Generate ``n`` tokens per prompt with each file in the page; print tokens/s and the texts."""
    query = (
        f"?autorun=1&n={n}" + ("&letters=1" if letters else "") + (f"&threads={threads}" if threads else "")
    )
    with chromium() as browser:
        for file in files:
            with serving(file) as url:
                page, outside = run_page(browser, url, query)
                got = results(page)
                page.close()
            if got["status"] != "done":
                print(f"{file}: error: {got.get('error')}")
                continue
            speeds = ", ".join(f"{r['lang']} {r['llama_tokens_per_s']:.1f}" for r in got["runs"])
            print(
                f"{file}: {got['tokens_per_s']:.1f} tokens/s in the page ({n} tokens x {len(got['runs'])} "
                f"prompts, wall clock); llama.cpp generation: {speeds}; {got['threads']} thread(s), "
                f"loaded in {got['load_seconds']:.2f} s; requests outside the server: {len(outside)}"
            )
            for r in got["runs"]:
                print(f"  {r['lang']}: {(r['prompt'] + r['text'])[:120]!r}")
