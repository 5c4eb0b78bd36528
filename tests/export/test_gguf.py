"""GGUF export: f16 next-token log-probs equal the HF model's within 1e-3 relative on held-out-like
text; transformers' own GGUF loader (Qwen3-MoE; it has no Mixtral-as-llama expert support) reads the
same weights as our reader; the tokenizer survives; quantized files are smaller and close; llama.cpp
itself (llama-cpp-python, when installed) gives the HF model's next-token log-probs per language.
Refusals write nothing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

gguf = pytest.importorskip("gguf")

from moe_adapt.errors import MoEAdaptError  # noqa: E402
from moe_adapt.export.gguf import write_gguf  # noqa: E402
from moe_adapt.export.retention import gguf_as_checkpoint  # noqa: E402
from tests.eval.conftest import AR, EN  # noqa: E402

TEXT = AR[0] + " " + EN[1] + " " + AR[2]


def _logprobs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.float(), dim=-1)


@pytest.fixture(scope="module")
def files(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]
) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind in ("mixtral", "qwen3_moe"):
        for t in ("f16", "q8_0", "q4_0"):
            out[kind, t] = root / kind / f"model-{t}.gguf"
            report = write_gguf(checkpoints[kind], out[kind, t], t)
            assert report["arch"] == {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[kind]
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_layout_is_llama_cpps(files: dict[tuple[str, str], Path], kind: str) -> None:
    reader = gguf.GGUFReader(str(files[kind, "q8_0"]))
    tensors = {t.name: t for t in reader.tensors}
    exps = tensors["blk.1.ffn_gate_exps.weight"]
    assert [int(x) for x in exps.shape] == [64, 64, 8]  # ne = {n_embd, n_ff_exp, n_expert}
    assert exps.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert [int(x) for x in tensors["blk.0.ffn_down_exps.weight"].shape] == [64, 64, 8]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not any(".experts." in n for n in tensors)
    fields = reader.fields
    arch = "llama" if kind == "mixtral" else "qwen3moe"
    assert int(fields[f"{arch}.expert_count"].parts[-1][0]) == 8
    assert int(fields[f"{arch}.expert_used_count"].parts[-1][0]) == 2
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_f16_logprobs_match_hf(
    tmp_path: Path,
    files: dict[tuple[str, str], Path],
    checkpoints: dict[str, Path],
    kind: str,
    tokenizer: Any,
) -> None:
    from transformers import AutoModelForCausalLM

    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoints[kind])).eval()
    want = _logprobs(hf, ids)
    errors = {}
    for t in ("f16", "q8_0", "q4_0"):
        back = gguf_as_checkpoint(files[kind, t], checkpoints[kind], tmp_path / t)
        got = _logprobs(AutoModelForCausalLM.from_pretrained(str(back)).eval(), ids)
        errors[t] = float(((got - want).abs() / want.abs()).max())
    assert errors["f16"] < 1e-3
    assert (
        errors["f16"] < errors["q8_0"] < errors["q4_0"] < 0.2
    )  # quantized: close, and worse with fewer bits
    sizes = {t: files[kind, t].stat().st_size for t in ("f16", "q8_0", "q4_0")}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]


def test_transformers_gguf_loader_reads_the_same_weights(
    tmp_path: Path, files: dict[tuple[str, str], Path], checkpoints: dict[str, Path], tokenizer: Any
) -> None:
    """transformers' own GGUF loader on the Qwen3-MoE file equals our reader, token for token. Its
    config parser has no mapping for ``expert_feed_forward_length`` (it would build 768-wide experts),
    so the config is handed over; the weights come through its GGUF path. Its GGUF tokenizer encodes
    as the source tokenizer does."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = checkpoints["qwen3_moe"]
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    for t in ("f16", "q4_0"):
        file = files["qwen3_moe", t]
        theirs = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, config=AutoConfig.from_pretrained(src), dtype=torch.float32
        ).eval()
        ours = AutoModelForCausalLM.from_pretrained(str(gguf_as_checkpoint(file, src, tmp_path / t))).eval()
        assert torch.equal(_logprobs(theirs, ids), _logprobs(ours, ids))
    gguf_tok = AutoTokenizer.from_pretrained(
        str(files["qwen3_moe", "f16"].parent), gguf_file="model-f16.gguf"
    )
    assert gguf_tok(TEXT).input_ids == tokenizer(TEXT).input_ids


def test_refusals_write_nothing(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["qwen3_moe"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    with pytest.raises(
        MoEAdaptError, match=r"qwen3_moe has norm_topk_prob=false: llama.cpp's qwen3moe always"
    ):
        write_gguf(bad, tmp_path / "out" / "m.gguf", "f16")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "router_bias.json").write_text("{}")
    with pytest.raises(
        MoEAdaptError, match=r"has router_bias.json: llama.cpp's experts have no selection bias"
    ):
        write_gguf(bad, tmp_path / "out" / "m.gguf", "f16")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_write_that_dies_leaves_no_file(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_adapt.export import gguf as export_gguf

    def boom(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_gguf, "_materialise", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(checkpoints["mixtral"], tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (its pip install builds llama.cpp: docs/export.md)",
)


def llama_cpp_logprobs(file: Path, ids: list[int]) -> torch.Tensor:
    """``[len(ids), vocab]`` float64: llama.cpp's next-token log-probs at every position of ``ids``
    (llama-cpp-python's ``Llama`` with ``logits_all=True``, one thread)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(file), n_ctx=128, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1
    )
    try:
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    return torch.log_softmax(torch.from_numpy(scores), dim=-1)


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe", "llama"])
def test_llama_cpp_next_token_logprobs_equal_hf_per_language(
    tmp_path: Path, checkpoints: dict[str, Path], kind: str, tokenizer: Any
) -> None:
    """llama.cpp itself (llama-cpp-python) on the f16 file of each layout (GGUF arch llama with experts,
    qwen3moe, qwen2moe with its shared expert, dense llama): the log-prob llama.cpp gives the HF model's
    greedy next token, at every position of Arabic and of English held-out-like text, within 1e-3
    relative of the HF model's in float32, and so is the whole distribution (measured: at most 8.4e-5);
    the greedy token is the same wherever HF's top two differ by more than f16's rounding."""
    from transformers import AutoModelForCausalLM

    file = tmp_path / "model-f16.gguf"
    write_gguf(checkpoints[kind], file, "f16")
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoints[kind])).eval()
    for lang, sents in (("ar", AR), ("en", EN)):
        ids = tokenizer(" ".join(sents[:3]), add_special_tokens=False).input_ids[:96]
        got = llama_cpp_logprobs(file, ids)
        want = _logprobs(hf, torch.tensor([ids]))[0].double()
        top2 = want.topk(2, dim=-1)
        greedy = top2.indices[:, 0]
        lp_got, lp_want = got.gather(1, greedy[:, None])[:, 0], top2.values[:, 0]
        greedy_rel = float(((lp_got - lp_want).abs() / lp_want.abs()).max())
        all_rel = float(((got - want).abs() / want.abs()).max())
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 2e-3
        same = bool((got.argmax(-1)[clear] == greedy[clear]).all())
        print(
            f"{kind} {lang}: {len(ids)} positions, greedy log-prob rel. error max {greedy_rel:.2e}, "
            f"whole distribution {all_rel:.2e}"
        )
        assert same, (kind, lang)
        assert greedy_rel < 1e-3, (kind, lang, greedy_rel)
        assert all_rel < 1e-3, (kind, lang, all_rel)


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_llama_cpp_runs_quantized_files_as_the_retention_report_measures_them(
    files: dict[tuple[str, str], Path],
    checkpoints: dict[str, Path],
    tmp_path: Path,
    kind: str,
    qtype: str,
    tokenizer: Any,
) -> None:
    """The retention report measures a quantized GGUF as its weights dequantized and run by
    transformers (gguf_as_checkpoint). llama.cpp running the file itself (its quantized matmuls round
    activations to 8 bits too) gives every next-token log-prob within 1e-2 relative of that model's
    (measured: at most 2.9e-3), per language."""
    from transformers import AutoModelForCausalLM

    proxy = gguf_as_checkpoint(files[kind, qtype], checkpoints[kind], tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(proxy)).eval()
    for lang, sents in (("ar", AR), ("en", EN)):
        ids = tokenizer(" ".join(sents[:3]), add_special_tokens=False).input_ids[:96]
        got = llama_cpp_logprobs(files[kind, qtype], ids)
        want = _logprobs(model, torch.tensor([ids]))[0].double()
        rel = float(((got - want).abs() / want.abs()).max())
        print(f"{kind} {qtype} {lang}: llama.cpp vs its dequantized weights in transformers: {rel:.2e}")
        assert rel < 1e-2, (kind, qtype, lang, rel)


@pytest.mark.parametrize("kind", ["qwen2_moe", "llama"])
def test_qwen2_moe_and_dense_llama_through_transformers_loader(
    tmp_path: Path, checkpoints: dict[str, Path], kind: str, tokenizer: Any
) -> None:
    """Qwen2-MoE (shared expert and its 1-D gate) and a dense Llama (llama.cpp's q/k permutation, the
    one the Mixtral file uses too): f16 log-probs of transformers' own GGUF loader within 1e-3 of the
    HF model. For Llama transformers reads every setting from the file's metadata alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = checkpoints[kind]
    file = tmp_path / "model-f16.gguf"
    write_gguf(src, file, "f16")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    want = _logprobs(AutoModelForCausalLM.from_pretrained(str(src)).eval(), ids)
    config = {"config": AutoConfig.from_pretrained(src)} if kind == "qwen2_moe" else {}
    theirs = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=file.name, dtype=torch.float32, **config
    ).eval()
    got = _logprobs(theirs, ids)
    assert float(((got - want).abs() / want.abs()).max()) < 1e-3
    ours = AutoModelForCausalLM.from_pretrained(str(gguf_as_checkpoint(file, src, tmp_path / "hf"))).eval()
    assert torch.equal(_logprobs(ours, ids), got)


def test_qwen2_moe_with_renormalised_top_k_is_refused(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["qwen2_moe"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": True}))
    with pytest.raises(
        MoEAdaptError, match=r"^export.methods has gguf but qwen2_moe has norm_topk_prob=true: "
    ):
        write_gguf(bad, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_rows_not_a_multiple_of_the_quant_block_stay_f16() -> None:
    from moe_adapt.export.gguf import GGUFTensorPlan, tensor_type

    q = gguf.GGMLQuantizationType
    wide, narrow = (
        GGUFTensorPlan("blk.0.ffn_down_exps.weight", (8, 64, 64), ()),
        GGUFTensorPlan("x", (8, 64, 48), ()),
    )
    assert tensor_type(wide, "q4_0") == q.Q4_0 and tensor_type(narrow, "q4_0") == q.F16
    assert (
        tensor_type(GGUFTensorPlan("blk.0.ffn_gate_inp.weight", (8, 64), ()), "q8_0") == q.F32
    )  # the router
    assert tensor_type(GGUFTensorPlan("blk.0.attn_norm.weight", (64,), ()), "f16") == q.F32
