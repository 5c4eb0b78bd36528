"""Load metrics against hand computations; aux-loss-free balancing on tiny Qwen3-MoE, Qwen2-MoE, Mixtral."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moe_adapt.checkpoint.router_bias import BIAS_FILE, RouterBias, load_router_bias, save_router_bias
from moe_adapt.engines.objectives import lm_cross_entropy
from moe_adapt.engines.router_health import dropped_tokens, expert_load, load_metrics
from moe_adapt.errors import CheckpointError, MoEAdaptError

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=128,
)
EXPERTS, TOP_K = 8, 2
# (family, config overrides, whether the router renormalises its top-k weights)
FAMILIES = [
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen2_moe", {"norm_topk_prob": True, "shared_expert_intermediate_size": 32}),
    ("mixtral", {}),
]
IDS = ["qwen3_moe", "qwen3_moe-norm", "qwen2_moe-norm", "mixtral"]


def tiny_moe(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny MoE causal LM (hidden 64, 2 layers, 8 experts, top-2) with every weight random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {**TINY, "num_experts_per_tok": TOP_K}
    if family == "mixtral":
        kwargs["num_local_experts"] = EXPERTS
    else:
        kwargs.update(num_experts=EXPERTS, moe_intermediate_size=32)
    if family == "qwen3_moe":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def routers(model: Any) -> list[Any]:
    return [layer.mlp.gate for layer in model.model.layers]


def normalises(model: Any) -> bool:
    return bool(getattr(model.config, "norm_topk_prob", True))  # Mixtral always renormalises


# -- load metrics -------------------------------------------------------------------------------
def test_expert_load() -> None:
    # layer 0, top-2 of 4: token 0 -> {0, 1}, token 1 -> {3, 2}, token 2 -> {0, 2}: counts [2, 1, 2, 1]
    # layer 1: every token prefers 1 then 0: counts [3, 3, 0, 0]
    layer0_TE = torch.tensor(
        [[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 2.0, 1.0]], requires_grad=True
    )
    layer1_TE = torch.tensor([[1.0, 2.0, 0.0, -1.0]] * 3)
    load_LE = expert_load([layer0_TE, layer1_TE], top_k=2)
    assert load_LE.dtype == torch.int64 and not load_LE.requires_grad
    assert load_LE.tolist() == [[2, 1, 2, 1], [3, 3, 0, 0]]
    # a bias of +1 on expert 3 of layer 0 (probabilities are < 1) puts it in every token's top-2,
    # next to each token's best unbiased expert: {3, 0}, {3, 2}, {3, 0}
    bias_LE = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert expert_load([layer0_TE, layer1_TE], 2, bias_LE).tolist() == [[2, 0, 1, 3], [3, 3, 0, 0]]
    with pytest.raises(MoEAdaptError, match="top_k=5"):
        expert_load([layer0_TE], top_k=5)
    with pytest.raises(MoEAdaptError, match=r"\[tokens, experts\]"):
        expert_load([layer0_TE, layer1_TE[:2]], top_k=2)
    with pytest.raises(MoEAdaptError, match="expert bias"):
        expert_load([layer0_TE], 2, bias_LE)
    with pytest.raises(MoEAdaptError, match="no router logits"):
        expert_load([], top_k=2)


def test_dropped_tokens() -> None:
    # 4 tokens, top-2, 4 experts: 8 assignments per layer, 2 per expert on average
    load_LE = torch.tensor([[6, 1, 1, 0], [2, 2, 2, 2]])
    # capacity ceil(8 / 4 · 1.0) = 2: layer 0 drops 6 − 2 = 4, the balanced layer none
    assert dropped_tokens(load_LE, 1.0, tokens=4, top_k=2).tolist() == [4, 0]
    # capacity ceil(2 · 1.2) = ceil(2.4) = 3 -> 3 dropped; ceil(2 · 1.5) = 3 too
    assert dropped_tokens(load_LE, 1.2, tokens=4, top_k=2).tolist() == [3, 0]
    assert dropped_tokens(load_LE, 1.5, tokens=4, top_k=2).tolist() == [3, 0]
    # capacity ceil(2 · 0.5) = 1: layer 0 drops 5 + 0 + 0, layer 1 drops 4 · 1
    assert dropped_tokens(load_LE, 0.5, tokens=4, top_k=2).tolist() == [5, 4]
    # dropless
    assert dropped_tokens(load_LE, None, tokens=4, top_k=2).tolist() == [0, 0]
    with pytest.raises(MoEAdaptError, match="capacity_factor=0"):
        dropped_tokens(load_LE, 0.0, tokens=4, top_k=2)


def test_load_metrics() -> None:
    load_LE = torch.tensor([[6, 1, 1, 0], [2, 2, 2, 2]])
    # layer 0 relative to its mean 2: [3, ½, ½, 0] -> max 3, min 0, std² = (4 + ¼ + ¼ + 1) / 4 = 11/8
    cv0 = math.sqrt(11 / 8)
    metrics = load_metrics(load_LE, dropped_tokens(load_LE, 1.0, tokens=4, top_k=2))
    expected = {
        "moe/layer0/max_load": 3.0,
        "moe/layer1/max_load": 1.0,
        "moe/layer0/min_load": 0.0,
        "moe/layer0/load_cv": cv0,
        "moe/layer1/min_load": 1.0,
        "moe/layer1/load_cv": 0.0,
        "moe/max_load": 3.0,
        "moe/mean_max_load": 2.0,
        "moe/min_load": 0.0,
        "moe/load_cv": cv0 / 2,
        "moe/idle_experts": 1.0,
        "moe/dropped_tokens": 4.0,
        "moe/dropped_frac": 4 / 16,
    }
    assert metrics == pytest.approx(expected)
    assert all(isinstance(v, float) for v in metrics.values())
    # deep models: per-layer max_load only, plus the summaries
    brief = load_metrics(load_LE, detail_layers=1)
    assert set(brief) == set(expected) - {
        "moe/layer0/min_load",
        "moe/layer0/load_cv",
        "moe/layer1/min_load",
        "moe/layer1/load_cv",
        "moe/dropped_tokens",
        "moe/dropped_frac",
    }
    with pytest.raises(MoEAdaptError, match="routed no tokens"):
        load_metrics(torch.zeros(2, 4, dtype=torch.int64))


# -- aux-loss-free balancing --------------------------------------------------------------------
@pytest.mark.parametrize(("family", "overrides"), FAMILIES, ids=IDS)
def test_zero_bias_is_bit_identical(family: str, overrides: dict[str, Any]) -> None:
    ids_BT = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for install in (False, True):
        model = tiny_moe(family, **overrides)
        if install:
            bias = RouterBias.install(model)
            assert bias.names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
        out = model(input_ids=ids_BT, output_router_logits=True, use_cache=False)
        lm_cross_entropy(out.logits[:, :-1], ids_BT[:, 1:]).backward()
        grads = [r.weight.grad for r in routers(model)]
        results.append((out.logits, out.router_logits, grads))
    (logits, router_LTE, grads), (logits_b, router_b_LTE, grads_b) = results
    assert torch.equal(logits, logits_b)
    assert len(router_b_LTE) == 2 and all(map(torch.equal, router_LTE, router_b_LTE))
    assert all(map(torch.equal, grads, grads_b))


def test_zero_bias_is_bit_identical_in_bfloat16() -> None:
    ids_BT = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    outputs = []
    for install in (False, True):
        model = tiny_moe("qwen3_moe", norm_topk_prob=True).to(torch.bfloat16)
        if install:
            RouterBias.install(model)
        outputs.append(model(input_ids=ids_BT, use_cache=False).logits)
    assert torch.equal(*outputs)


@pytest.mark.parametrize(("family", "overrides"), FAMILIES, ids=IDS)
def test_bias_changes_selection_not_weights(family: str, overrides: dict[str, Any]) -> None:
    model = tiny_moe(family, **overrides)
    plain = tiny_moe(family, **overrides)
    bias = RouterBias.install(model)
    forced = 5
    with torch.no_grad():
        for router in routers(model):
            router.expert_bias[forced] = 10.0  # probabilities are <= 1: always in the top-k
    hidden_TH = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    router = routers(model)[0]
    logits_TE, weights_TK, idx_TK = router(hidden_TH)
    plain_logits_TE, _, plain_idx_TK = routers(plain)[0](hidden_TH)
    assert torch.equal(logits_TE, plain_logits_TE)  # the logits stay unbiased
    assert torch.equal(logits_TE, F.linear(hidden_TH, router.weight))
    assert bool((idx_TK == forced).any(dim=-1).all())
    assert not bool((plain_idx_TK == forced).any(dim=-1).all())  # the bias did change the routing
    # the other pick is each token's best unbiased expert besides the forced one
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    others_TE = probs_TE.clone()
    others_TE[:, forced] = -1.0
    assert torch.equal(idx_TK[:, 1], others_TE.argmax(dim=-1))
    # gate weights: the unbiased probabilities of the chosen experts, renormalised when the model does
    expected_TK = probs_TE.gather(-1, idx_TK)
    if normalises(model):
        expected_TK = expected_TK / expected_TK.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(weights_TK.sum(dim=-1), torch.ones(32))
    torch.testing.assert_close(weights_TK, expected_TK, rtol=0, atol=0)
    # through the whole model: layer 0's router sees the same input, so its logits match the plain
    # model's exactly; the recorded logits are the unbiased ones, and the biased routing is applied
    ids_BT = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids_BT, output_router_logits=True, use_cache=False)
    plain_out = plain(input_ids=ids_BT, output_router_logits=True, use_cache=False)
    assert torch.equal(out.router_logits[0], plain_out.router_logits[0])
    assert not torch.equal(out.logits, plain_out.logits)
    load_LE = expert_load(out.router_logits, TOP_K, bias.bias_LE())
    assert load_LE[:, forced].tolist() == [32, 32]  # every one of the 2 × 16 tokens, in both layers


def test_update_sign_rule() -> None:
    model = tiny_moe("qwen3_moe")
    u = 0.125  # a power of two: the sums below are exact
    bias = RouterBias.install(model, update_rate=u)
    # layer 0: mean load 4 -> experts above move down by u, below up by u, at the mean stay
    load_LE = torch.tensor([[8, 0, 4, 4, 6, 2, 4, 4], [4] * 8])
    bias.update(load_LE)
    expected_E = torch.tensor([-u, u, 0.0, 0.0, -u, u, 0.0, 0.0])
    assert torch.equal(bias.bias_LE(), torch.stack([expected_E, torch.zeros(8)]))
    assert torch.equal(routers(model)[0].expert_bias, expected_E)  # the buffer the hook reads
    bias.update(load_LE)
    assert torch.equal(bias.bias_LE()[0], 2 * expected_E)
    with pytest.raises(MoEAdaptError, match="2 routers × 8 experts"):
        bias.update(torch.zeros(2, 4))
    with pytest.raises(MoEAdaptError, match="update_rate"):
        RouterBias.install(tiny_moe("mixtral"), update_rate=0.0)


def test_state_round_trip_and_remove() -> None:
    ids_BT = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_moe("qwen3_moe", norm_topk_prob=True)
    bias = RouterBias.install(model, update_rate=0.05)
    for seed in range(3):
        load_LE = torch.randint(0, 20, (2, EXPERTS), generator=torch.Generator().manual_seed(seed))
        bias.update(load_LE)
    state = bias.state_dict()
    assert set(state) == {"expert_bias_LE"} and state["expert_bias_LE"].shape == (2, EXPERTS)
    assert not any("expert_bias" in k for k in model.state_dict())  # checkpoints stay vanilla

    fresh = tiny_moe("qwen3_moe", norm_topk_prob=True)
    restored = RouterBias.install(fresh, update_rate=0.05)
    restored.load_state_dict(state)
    assert torch.equal(restored.bias_LE(), bias.bias_LE())
    assert torch.equal(model(input_ids=ids_BT).logits, fresh(input_ids=ids_BT).logits)
    with pytest.raises(CheckpointError, match="does not fit 2 routers × 8 experts"):
        restored.load_state_dict({"expert_bias_LE": torch.zeros(3, EXPERTS)})

    with pytest.raises(MoEAdaptError, match="installed twice"):
        RouterBias.install(fresh)
    # remove() gives the plain model back
    restored.remove()
    assert not hasattr(routers(fresh)[0], "expert_bias")
    plain = tiny_moe("qwen3_moe", norm_topk_prob=True)
    assert torch.equal(fresh(input_ids=ids_BT).logits, plain(input_ids=ids_BT).logits)


def test_bias_file_beside_an_hf_checkpoint(tmp_path: Path) -> None:
    ids_BT = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_moe("mixtral")
    bias = RouterBias.install(model)
    with torch.no_grad():
        for router in bias.routers:
            router.expert_bias.normal_(0.0, 0.3)  # arbitrary float32 values must survive JSON exactly
    model.save_pretrained(tmp_path)
    save_router_bias(bias, tmp_path)
    assert (tmp_path / BIAS_FILE).is_file()

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # vanilla transformers ignores the file
    restored = load_router_bias(loaded, tmp_path)
    assert restored is not None and torch.equal(restored.bias_LE(), bias.bias_LE())
    assert torch.equal(loaded(input_ids=ids_BT).logits, model(input_ids=ids_BT).logits)
    assert load_router_bias(tiny_moe("mixtral"), tmp_path / "elsewhere") is None
    (tmp_path / BIAS_FILE).write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a router bias file"):
        load_router_bias(tiny_moe("mixtral"), tmp_path)


def test_unsupported_models() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    olmoe = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "olmoe", **{**TINY, "num_experts": 4, "num_experts_per_tok": 2, "eos_token_id": 2}
        )
    )
    with pytest.raises(MoEAdaptError, match="does not support OlmoeTopKRouter .*OlmoeForCausalLM"):
        RouterBias.install(olmoe)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY))
    with pytest.raises(MoEAdaptError, match="no router in LlamaForCausalLM"):
        RouterBias.install(dense)


def skewed_qwen3_moe() -> Any:
    """Tiny Qwen3-MoE whose routers favour experts 0 and 1 for every token (a feature all tokens share)."""
    model = tiny_moe("qwen3_moe", norm_topk_prob=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.5  # every token carries feature 0 ...
        for router in routers(model):
            router.weight.normal_(0.0, 0.05)
            router.weight[:, 0] = 0.0
            router.weight[:2, 0] = 0.5  # ... and experts 0 and 1 respond to it
    return model


def train_skewed(update_rate: float | None, steps: int = 20) -> list[float]:
    """``moe/mean_max_load`` of each step of LM-only training (no aux loss), with or without the bias."""
    model = skewed_qwen3_moe()
    model.train()
    bias = RouterBias.install(model, update_rate) if update_rate else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        tokens_BT1 = torch.randint(0, 97, (4, 33), generator=data)
        out = model(input_ids=tokens_BT1[:, :-1], output_router_logits=True, use_cache=False)
        lm_cross_entropy(out.logits, tokens_BT1[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        load_LE = expert_load(out.router_logits, TOP_K, bias.bias_LE() if bias else None)
        if bias is not None:
            bias.update(load_LE)
        history.append(load_metrics(load_LE)["moe/mean_max_load"])
    return history


def test_bias_balances_a_skewed_router() -> None:
    plain = train_skewed(None)
    biased = train_skewed(0.01)
    assert plain[0] == biased[0] > 3.0  # same start: one expert takes nearly every token
    tail_plain, tail_biased = sum(plain[-5:]) / 5, sum(biased[-5:]) / 5
    print(f"mean_max_load, mean of the last 5 of 20 steps: plain {tail_plain:.2f}, biased {tail_biased:.2f}")
    assert tail_plain > 3.5
    assert tail_biased < 0.75 * tail_plain
