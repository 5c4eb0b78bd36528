"""The browser page (moe_adapt/export/web): a tiny Mixtral built here, exported with the gguf method,
served by ``moe_adapt.export.web`` and run by wllama (llama.cpp in WebAssembly) in Debian's headless
Chromium driven by playwright. The page generates Arabic and English text and reports tokens/s; no
request leaves the local server; llama.cpp's greedy next token and its log-prob equal the HF model's.

Skips unless Chromium (``/usr/bin/chromium``, or ``$MOE_ADAPT_CHROMIUM``), the playwright package and
the page's npm runtime (``python -m moe_adapt.export.web install``) are all here; ``.ci/run``
installs them."""

from __future__ import annotations

import importlib.util
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.export import web
from moe_adapt.export.web.browser import CHROMIUM, chromium, results, run_page
from tests.eval.conftest import AR, EN

needs_runtime = pytest.mark.skipif(
    not web.runtime_installed(),
    reason="the page's npm runtime is missing: python -m moe_adapt.export.web install",
)
needs_browser = pytest.mark.skipif(
    not Path(CHROMIUM).is_file() or importlib.util.find_spec("playwright") is None,
    reason=f"no Chromium at {CHROMIUM} or no playwright (pip install 'moe-adapt[web]')",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    """A tiny Mixtral (8 experts, top-2) as HF checkpoint and as f16 / q8_0 GGUF files."""
    pytest.importorskip("gguf")
    from moe_adapt.export.gguf import write_gguf
    from tests.export.conftest import tiny_model

    root = tmp_path_factory.mktemp("web")
    tiny_model("mixtral", len(tokenizer)).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    out = {"hf": root / "hf"}
    for t in ("f16", "q8_0"):
        write_gguf(root / "hf", root / f"model-{t}.gguf", t)
        out[t] = root / f"model-{t}.gguf"
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.mark.slow
@needs_runtime
@needs_browser
def test_page_generates_arabic_and_english_offline(browser: Any, exported: dict[str, Path]) -> None:
    with web.serving(exported["q8_0"]) as url:
        page, outside = run_page(browser, url, "?autorun=1&n=64&letters=1", ("done",))
        got = results(page)
        ar_text, en_text = page.locator("#out-ar").text_content(), page.locator("#out-en").text_content()
        speed = page.locator("#speed").text_content()
        page.close()
    assert got["status"] == "done", got.get("error")
    assert got["arch"] == "llama" and got["n_layer"] == 2 and got["n_vocab"] >= 320
    assert got["model_bytes"] == exported["q8_0"].stat().st_size
    runs = {r["lang"]: r for r in got["runs"]}
    assert set(runs) == {"ar", "en"}
    for r in runs.values():
        assert r["text"].strip(), r
        assert r["tokens"] == 64
        assert r["tokens_per_s"] > 0 and r["llama_tokens_per_s"] > 0
    assert got["tokens_per_s"] > 0 and "tokens/s" in speed
    assert ar_text.startswith(AR_PROMPT) and len(ar_text) > len(AR_PROMPT)
    assert en_text.startswith("The Prophet said") and len(en_text) > len("The Prophet said")
    assert outside == []  # offline: the runtime and the model came from the local server only
    print(
        f"browser tokens/s: {got['tokens_per_s']:.1f} (page), llama.cpp "
        f"{ {k: round(r['llama_tokens_per_s'], 1) for k, r in runs.items()} }, threads {got['threads']}"
    )


AR_PROMPT = "قال رسول الله"


def _candidates() -> list[tuple[str, str]]:
    """Prompts: the first 1, 2, ... words of every Arabic and English test sentence."""
    out = []
    for lang, sents in (("ar", AR), ("en", EN)):
        for s in sents:
            words = s.split()
            out += [(lang, " ".join(words[:k])) for k in range(1, len(words))]
    return out


@pytest.mark.slow
@needs_runtime
@needs_browser
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_llama_cpp_greedy_next_token_equals_hf(
    browser: Any,
    exported: dict[str, Path],
    tokenizer: Any,
    tmp_path: Path,
    kind: str,
) -> None:
    """llama.cpp (wllama) on the f16 file of each MoE layout (GGUF arch llama with experts, qwen3moe,
    qwen2moe with its shared expert): same prompt length (its tokenizer), same greedy next token and
    the same log-prob of it as the HF model in float32, for Arabic and English prompts. Prompts whose
    greedy token is not whole UTF-8 by itself are left out (wllama cannot return those, see app.js)."""
    from transformers import AutoModelForCausalLM

    from moe_adapt.export.gguf import write_gguf
    from tests.export.conftest import tiny_model

    if kind != "mixtral":
        exported = {"hf": tmp_path / "hf", "f16": tmp_path / "model-f16.gguf"}
        tiny_model(kind, len(tokenizer)).save_pretrained(exported["hf"])
        tokenizer.save_pretrained(exported["hf"])
        write_gguf(exported["hf"], exported["f16"], "f16")
    hf = AutoModelForCausalLM.from_pretrained(str(exported["hf"])).eval()
    chosen: list[tuple[str, str, list[int], int, float]] = []
    for lang, prompt in _candidates():
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        (first, second), (top, _) = logprobs.topk(2).values.tolist(), logprobs.topk(2).indices.tolist()
        if "\ufffd" in tokenizer.decode([top]) or top in tokenizer.all_special_ids:
            continue
        if first - second < 2e-3:  # a near tie (random weights): f16 activations may pick either
            continue
        chosen.append((lang, prompt, ids, top, first))
    by_lang = {lang: [c for c in chosen if c[0] == lang][:4] for lang in ("ar", "en")}
    assert all(len(v) >= 2 for v in by_lang.values()), {k: len(v) for k, v in by_lang.items()}
    with web.serving(exported["f16"]) as url:
        page, outside = run_page(browser, url, "", ("ready",))
        assert results(page)["status"] == "ready", results(page).get("error")
        errors = []
        for lang, prompt, ids, top, lp in by_lang["ar"] + by_lang["en"]:
            got = page.evaluate("([p]) => window.moeAdapt.nextTokens(p, 1)", [prompt])
            assert got["raw"]["usage"]["prompt_tokens"] == len(ids), (lang, prompt)
            step = got["logprobs"]["content"][0]
            assert step["id"] == top, (lang, prompt, step, top)
            errors.append(abs(step["logprob"] - lp) / abs(lp))
        page.close()
    assert outside == []
    assert max(errors) < 1e-3, errors
    print(f"{kind}: llama.cpp vs HF log-prob, relative error max {max(errors):.2e} ({len(errors)} prompts)")


@needs_runtime
def test_server_serves_the_page_runtime_and_model_only(exported: dict[str, Path]) -> None:
    with web.serving(exported["q8_0"]) as url:
        for path, mime in (
            ("", "text/html"),
            ("app.js", "text/javascript"),
            ("vendor/wllama/esm/index.js", "text/javascript"),
            ("vendor/wllama/esm/wasm/wllama.wasm", "application/wasm"),
            ("model.gguf", "application/octet-stream"),
        ):
            with urllib.request.urlopen(url + path) as r:
                assert r.headers["Content-Type"].startswith(mime), path
                assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                if path == "model.gguf":
                    assert r.read() == exported["q8_0"].read_bytes()
        for bad in (
            "vendor/wllama/../../../../__init__.py",
            "vendor/wllama/package.json/x",
            "__init__.py",
            "nope",
        ):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + bad)
            assert e.value.code == 404, bad
    assert url.startswith("http://127.0.0.1:")


def test_serve_refuses_what_is_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(MoEAdaptError, match=r"is not a \.gguf file"), web.serving(tmp_path / "x.safetensors"):
        pass
    with (
        pytest.raises(MoEAdaptError, match=r"'.*nope.gguf' does not exist"),
        web.serving(tmp_path / "nope.gguf"),
    ):
        pass


def test_export_serve_serves_the_runs_file_even_when_the_stage_is_complete(
    tmp_path: Path, exported: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stages=[export] export.serve=true`` on a run whose export is complete: the stage is skipped
    (serve is not part of its fingerprint) and the page is served with ``gguf/model-q8_0.gguf``."""
    from moe_adapt.config import compose, to_config
    from moe_adapt.runner import run_pipeline

    shutil.copytree(exported["hf"], tmp_path / "cpt" / "model")
    base = [f"run_dir={tmp_path}", "stages=[export]", "export.methods=[gguf]", "export.heldout=null"]
    base += ["export.gguf.types=[q8_0]", "logger=none"]
    raw = compose(base)
    run_pipeline(to_config(raw), raw)
    made = (tmp_path / "export" / "gguf" / "model-q8_0.gguf").stat().st_mtime_ns
    served: list[tuple[Path, str, int]] = []
    monkeypatch.setattr(web, "serve", lambda model, host, port: served.append((Path(model), host, port)))
    monkeypatch.setattr(web, "runtime_installed", lambda: True)
    raw = compose([*base, "export.serve=true", "export.web.port=0"])
    run_pipeline(to_config(raw), raw)
    assert served == [(tmp_path / "export" / "gguf" / "model-q8_0.gguf", "127.0.0.1", 0)]
    assert (tmp_path / "export" / "gguf" / "model-q8_0.gguf").stat().st_mtime_ns == made  # not redone


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["export.serve=true", "export.methods=[expert_prune]"],
            r"^export.serve=True is invalid: the page loads gguf/model-q8_0.gguf: needs gguf in export.meth",
        ),
        (
            ["export.serve=true", "export.gguf.types=[f16]"],
            r"^export.serve=True is invalid: .* export.web.gguf_type in export.gguf.types \(got \['f16'\]\)$",
        ),
        (
            ["export.web.gguf_type=q2_k"],
            r"^export.web.gguf_type='q2_k' is invalid: one of f32, f16, q8_0, q4_0$",
        ),
    ],
)
def test_serve_config_errors_are_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    from moe_adapt.config import compose, to_config

    with pytest.raises(MoEAdaptConfigError, match=message):
        to_config(compose([f"run_dir={tmp_path}", "stages=[export]", *overrides]))
