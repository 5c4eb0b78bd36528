"""Routing analysis on a tiny Qwen3-MoE whose routers send known tokens to known experts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.routing import (
    analyze_routing,
    collect_routing_counts,
    find_routers,
    jensen_shannon,
    plot_routing,
    routing_report,
)

H, E = 64, 8
# Token groups: each group's embedding is one basis direction of the residual stream.
G0, G1, G2, PAD = range(1, 11), range(11, 21), range(21, 31), 0


@pytest.fixture(scope="module")
def model() -> Qwen3MoeForCausalLM:
    """Attention, experts and the dense MLP write zeros, so every layer's router sees the embedding.

    Layer 0 (MoE): G0 -> experts {0, 1}, G1 -> {0, 2}, G2 -> {4, 5}, PAD -> {3, 7}.
    Layer 1: dense MLP (``mlp_only_layers=[1]``), no router.
    Layer 2 (MoE): G0, G1, G2 -> {6, 7}; PAD -> {3, 7}.
    """
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=32,
        hidden_size=H,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=E,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        max_position_embeddings=64,
    )
    m = Qwen3MoeForCausalLM(cfg).eval()
    eye = torch.eye(H)
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb.zero_()
        for group, direction in ((G0, 0), (G1, 1), (G2, 2), ([PAD], 3)):
            emb[list(group)] = eye[direction]
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for p in layer.mlp.parameters():
                p.zero_()
        w0 = m.model.layers[0].mlp.gate.weight
        w0[0] = 10 * (eye[0] + eye[1])
        w0[1], w0[2] = 9 * eye[0], 9 * eye[1]
        w0[4], w0[5] = 10 * eye[2], 9 * eye[2]
        w2 = m.model.layers[2].mlp.gate.weight
        w2[6], w2[7] = 10 * (eye[0] + eye[1] + eye[2]), 9 * (eye[0] + eye[1] + eye[2])
        for w in (w0, w2):
            w[3], w[7] = w[3] + 20 * eye[3], w[7] + 19 * eye[3]
    return m


def docs() -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ar_vocab = torch.tensor([*G0, *G1])
    ar = [ar_vocab[torch.randint(0, 20, (n,), generator=g)] for n in (13, 4, 9)]
    en = [torch.randint(21, 31, (n,), generator=g) for n in (7, 11)]
    en.append(en[0].numpy())  # numpy arrays work too
    return {"ar": ar, "en": en}


def expected_counts(d: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for lang, seqs in d.items():
        ids = np.concatenate([np.asarray(s) for s in seqs])
        n0, n1, n2 = (int(np.isin(ids, list(g)).sum()) for g in (G0, G1, G2))
        c = np.zeros((2, E), dtype=np.int64)
        c[0, 0], c[0, 1], c[0, 2], c[0, 4], c[0, 5] = n0 + n1, n0, n1, n2, n2
        c[1, 6] = c[1, 7] = n0 + n1 + n2
        out[lang] = c
    return out


def test_counts_match_hand_set_router_and_skip_padding(model: Qwen3MoeForCausalLM) -> None:
    d = docs()
    layer_ids, counts = collect_routing_counts(model, d, batch_size=2)
    assert layer_ids == [0, 2]
    want = expected_counts(d)
    for lang in d:
        np.testing.assert_array_equal(counts[lang], want[lang])
    assert counts["ar"][:, 3].sum() == 0  # padded positions (PAD -> expert 3) are not counted


def test_analysis_jsd_specialisation_and_load(model: Qwen3MoeForCausalLM) -> None:
    d = docs()
    layer_ids, counts = collect_routing_counts(model, d, batch_size=4)
    a = analyze_routing(counts, layer_ids=layer_ids, specialization_threshold=0.7)
    json.dumps(a)  # JSON-able
    n_ar = sum(len(s) for s in d["ar"])
    assert a["tokens"]["ar"] == [2 * n_ar, 2 * n_ar]
    assert a["jsd_nats"]["ar|en"] == pytest.approx([math.log(2), 0.0], abs=1e-12)
    spec = a["specialization"]
    assert spec["share_of_used_experts"] == [1.0, 0.0]
    assert spec["unused_experts"] == [3, 6]
    assert spec["experts_by_language"] == {"ar": [[0, 1, 2], []], "en": [[4, 5], []]}
    # Layer 2: two experts each take half of all assignments.
    assert a["load_imbalance"]["max_over_mean"][1] == pytest.approx(4.0)
    assert a["load_imbalance"]["cv"][1] == pytest.approx(np.std([1, 1, 0, 0, 0, 0, 0, 0]) / 0.25)
    np.testing.assert_allclose(np.sum(a["distribution"]["en"], axis=1), 1.0)


def test_specialisation_normalises_by_language_size() -> None:
    # 'ar' has 10x the tokens of 'en'; expert 1 gets 50 ar and 50 en assignments, i.e. 5% of ar's
    # routing but 50% of en's: after normalising, en owns 0.5 / 0.55 = 91% of it.
    counts = {"ar": np.array([[950, 50]]), "en": np.array([[50, 50]])}
    a = analyze_routing(counts, specialization_threshold=0.9)
    assert a["specialization"]["experts_by_language"] == {"ar": [[]], "en": [[1]]}


def test_jensen_shannon_limits() -> None:
    p = np.array([0.1, 0.2, 0.7])
    assert jensen_shannon(p, p) == pytest.approx(0.0, abs=1e-15)
    assert jensen_shannon([1, 1, 0, 0], [0, 0, 2, 3]) == pytest.approx(math.log(2))
    assert jensen_shannon([1, 0], [1, 1]) == pytest.approx(jensen_shannon([1, 1], [1, 0]))
    with pytest.raises(MoEAdaptError):
        jensen_shannon([0, 0], [1, 0])


def test_bad_inputs(model: Qwen3MoeForCausalLM) -> None:
    dense = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=8
        )
    )
    with pytest.raises(MoEAdaptError, match="no MoE router"):
        find_routers(dense)
    with pytest.raises(MoEAdaptError, match="shape"):
        analyze_routing({"ar": np.ones((2, 8)), "en": np.ones((2, 4))})
    with pytest.raises(MoEAdaptError, match="specialization_threshold"):
        analyze_routing({"ar": np.ones((2, 8))}, specialization_threshold=0.4)


def test_report_writes_json_and_readable_plots(model: Qwen3MoeForCausalLM, tmp_path) -> None:
    analysis = routing_report(model, docs(), tmp_path, batch_size=3)
    on_disk = json.loads((tmp_path / "routing.json").read_text())
    assert on_disk["jsd_nats"] == analysis["jsd_nats"]
    for name in ("routing_heatmap.png", "routing_jsd.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    # Three languages: no difference panel, three JSD pairs.
    three = {"ar": np.ones((2, E)), "he": np.eye(2, E), "en": np.eye(2, E)[::-1]}
    paths = plot_routing(analyze_routing(three), tmp_path / "three")
    assert [p.name for p in paths] == ["routing_heatmap.png", "routing_jsd.png"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_other_moe_layouts_are_supported(arch: str) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    common |= dict(num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    if arch == "mixtral":
        m = MixtralForCausalLM(MixtralConfig(num_local_experts=4, **common))
    else:
        cfg = Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, **common
        )
        m = Qwen2MoeForCausalLM(cfg)
    seqs = {"ar": [torch.randint(1, 32, (n,)) for n in (5, 9)], "en": [torch.randint(1, 32, (6,))]}
    layer_ids, counts = collect_routing_counts(m, seqs, batch_size=2)
    assert layer_ids == [0, 1]
    assert counts["ar"].shape == (2, 4) and counts["ar"].sum(axis=1).tolist() == [28, 28]
    assert counts["en"].sum(axis=1).tolist() == [12, 12]
