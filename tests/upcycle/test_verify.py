"""Layer-by-layer verification: equals the whole-model check, names a broken layer, stays in bounded
memory, and a model that was not checked is never reported exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_adapt.errors import MoEAdaptError
from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.convert import Upcycler
from moe_adapt.upcycle.verify import EPS32, judge, tolerances, verify_checkpoints, verify_layerwise

from .test_bad_input import run_upcycle

FAMILIES = [
    ("llama", dict(target="mixtral", granularity=4, num_experts=8, top_k=4)),
    ("qwen2", dict(target="qwen2_moe", granularity=4, shared_experts=1, num_experts=6, top_k=3)),
    ("qwen3", dict(target="qwen3_moe", granularity=2, num_experts=6, top_k=4)),
]


def upcycle(dense: Path, out: Path, **kw: object) -> Path:
    up = Upcycler(str(dense), UpcycleConfig(**kw), seed=0)
    try:
        out.mkdir(parents=True)
        up.write(out, progress=False)
    finally:
        up.close()
    return out


@pytest.mark.parametrize(("family", "kw"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_streaming_equals_whole_model_check(dense_factory, tmp_path, family, kw):
    dense = dense_factory(family, num_hidden_layers=3)
    moe = upcycle(dense, tmp_path / "moe", **kw)
    streamed = verify_layerwise(dense, moe, probes=3, seq_len=20, seed=1)
    whole = verify_checkpoints(dense, moe, probes=3, seq_len=20, seed=1)
    # the MoE's own hidden states are carried through, so its logits are the whole model's, bit for bit
    assert streamed["logits"]["random"] == {k: v for k, v in whole.items() if k != "reference"}
    assert len(streamed["layers"]) == 3
    assert judge(streamed, tolerances(64, 3)) == []
    assert max(x["max_rel_diff"] for x in streamed["layers"]) < 16 * EPS32


def test_a_perturbed_expert_fails_and_names_its_layer(dense_factory, tmp_path):
    dense = dense_factory("llama", num_hidden_layers=3)
    moe = upcycle(dense, tmp_path / "moe", granularity=2, num_experts=4, top_k=2)
    weights = load_file(moe / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    weights[name] = weights[name] * (1 + 2**-8)  # one bf16 ulp, relative, on one expert
    save_file(weights, moe / "model.safetensors", metadata={"format": "pt"})
    result = verify_layerwise(dense, moe, probes=2, seq_len=16, seed=0)
    failures = judge(result, tolerances(64, 3))
    assert failures and failures[0].startswith("layer 1:"), failures
    assert not any(f.startswith(("layer 0", "layer 2")) for f in failures)


def test_bf16_output_is_compared_with_the_rounded_dense_model(dense_factory, tmp_path):
    dense = dense_factory("llama")
    moe = upcycle(dense, tmp_path / "moe", granularity=2, num_experts=4, top_k=2, dtype="bfloat16")
    result = verify_layerwise(dense, moe, probes=2, seq_len=16, seed=0)
    assert "rounded to bfloat16" in result["reference"]
    assert judge(result, tolerances(64, 2)) == []


def test_text_probes_with_a_tokenizer(dense_factory, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dense = shutil.copytree(dense_factory("llama"), tmp_path / "dense")
    vocab = {"[UNK]": 0, **{chr(c): i + 1 for i, c in enumerate(range(ord("a"), ord("z") + 1))}}
    vocab |= {chr(c): len(vocab) + i for i, c in enumerate(range(0x0621, 0x064B))}  # Arabic letters
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(dense)
    moe = upcycle(dense, tmp_path / "moe", granularity=2, num_experts=4, top_k=2)
    result = verify_layerwise(dense, moe, probes=2, seq_len=16, seed=0)
    assert result["logits"]["text"]["sequences"] == 6
    assert judge(result, tolerances(64, 2)) == []


def test_stage_reports_layers_and_never_calls_unchecked_output_exact(dense_factory, tmp_path):
    dense = dense_factory("qwen2")
    run_dir = run_upcycle(tmp_path / "a", dense, "upcycle.num_experts=8")
    report = json.loads((run_dir / "upcycle" / "report.json").read_text())
    verify = report["verify"]
    assert report["exact"] is True and verify["exact"] is True and verify["mode"] == "layers"
    assert [x["layer"] for x in verify["layers"]] == [0, 1] and verify["failures"] == []
    assert verify["tolerance"]["layer"] == pytest.approx(64 * EPS32)

    run_dir = run_upcycle(tmp_path / "b", dense, "upcycle.num_experts=8", "upcycle.verify=none")
    report = json.loads((run_dir / "upcycle" / "report.json").read_text())
    assert report["exact"] is None and report["verify"] == {
        "mode": "none",
        "exact": None,
        "expected_exact": True,
    }
    assert report["exact_by_construction"] is True


def test_stage_whole_model_mode(dense_factory, tmp_path):
    run_dir = run_upcycle(tmp_path, dense_factory("llama"), "upcycle.num_experts=8", "upcycle.verify=logits")
    verify = json.loads((run_dir / "upcycle" / "report.json").read_text())["verify"]
    assert verify["mode"] == "logits" and verify["exact"] is True and "layers" not in verify


def test_tolerance_counts_rounding_units():
    with pytest.raises(MoEAdaptError, match="fp32 rounding units"):
        UpcycleConfig(verify_tolerance=1e-5)
    tol = tolerances(64, 30)
    assert tol["layer"] == pytest.approx(7.63e-6, rel=1e-3) and tol["logits"] == pytest.approx(
        2.29e-4, rel=1e-2
    )


MEASURE = """
import json, sys
import torch
torch.set_num_threads(1)
import transformers.models.llama.modeling_llama, transformers.models.mixtral.modeling_mixtral
from moe_adapt.upcycle.verify import verify_layerwise, verify_checkpoints
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the resident size now: the imports' peak is not measured
before = status("VmRSS")
fn = verify_layerwise if sys.argv[3] == "layers" else verify_checkpoints
fn(sys.argv[1], sys.argv[2], probes=2, seq_len=16, seed=0)
print(json.dumps({"before": before, "after": status("VmHWM")}))
"""


def write_synthetic_dense(path: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A random Llama checkpoint written directly with safetensors; returns its fp32 bytes."""
    path.mkdir()
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": vocab,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    }
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    w: dict[str, torch.Tensor] = {}

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    w["model.embed_tokens.weight"] = rand(vocab, hidden)
    w["lm_head.weight"] = rand(vocab, hidden)
    w["model.norm.weight"] = torch.ones(hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            w[f"{p}self_attn.{proj}_proj.weight"] = rand(hidden, hidden)
        w[f"{p}mlp.gate_proj.weight"] = rand(ffn, hidden)
        w[f"{p}mlp.up_proj.weight"] = rand(ffn, hidden)
        w[f"{p}mlp.down_proj.weight"] = rand(hidden, ffn)
        w[f"{p}input_layernorm.weight"] = torch.ones(hidden)
        w[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden)
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() for t in w.values()) * 4


def peak_rss_growth(dense: Path, moe: Path, mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(dense), str(moe), mode],
        capture_output=True,
        text=True,
        check=True,
        env={
            "OMP_NUM_THREADS": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path.cwd()),
            "HF_HUB_OFFLINE": "1",
            # a fixed threshold: glibc otherwise raises it to the largest block freed so far, after
            # which freed tensors stay in the heap and the peak measures the allocator, not the check
            "MALLOC_MMAP_THRESHOLD_": str(2**20),
        },
    )
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    return int(rss["after"] - rss["before"])


def test_streaming_memory_is_bounded_by_a_few_layers(tmp_path):
    """Hidden 512: one layer of the dense model and one of the MoE are ~21 MB together in fp32, and the
    whole-model check grows by that much per layer. The layer-wise check holds one layer of each plus
    embeddings and heads, so going from 4 layers to 16 must not grow its peak by even two layers'
    worth. Measured (fixed malloc mmap threshold): ~53 MiB at 4 layers, 60-67 MiB at 16, against
    2 x 168 MiB for both whole models at 16 layers."""
    hidden, ffn, vocab = 512, 1024, 2048
    grown, whole = {}, {}
    for layers in (4, 16):
        folder = tmp_path / str(layers)
        folder.mkdir()
        whole[layers] = 2 * write_synthetic_dense(folder / "dense", layers, hidden, ffn, vocab)
        moe = upcycle(folder / "dense", folder / "moe", granularity=4, num_experts=8, top_k=4)
        grown[layers] = peak_rss_growth(folder / "dense", moe, "layers")
    per_layer = (whole[16] - whole[4]) / 12  # both models' bytes per layer (the MoE's routers aside)
    assert grown[16] - grown[4] < 2 * per_layer, (grown, per_layer)
    assert grown[16] < whole[16] / 2, (grown, whole)
