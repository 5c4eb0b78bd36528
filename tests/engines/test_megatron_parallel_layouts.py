"""Tensor-parallel slicing and grouped-GEMM expert layouts of the HF ⇄ megatron-core mapping.

Mapping-only tests check the slices and layouts tensor by tensor and that gathering every rank's
shard gives the HF tensors back bit for bit. The megatron tests (CPU shim, gloo) check that the
models built from those shards compute what HF computes: grouped GEMM in one process, and in one
spawn of two processes TP=2 for the three families (plus a Qwen2-MoE with a dense layer and tied
embeddings), TP=2 with expert tensor parallel, grouped GEMM under TP, TP=2 x EP=2 on the same two
ranks, and a TP=2 training step (sequence parallel) whose loss and reduced gradients equal HF's.
TP=2 x EP=2 x ETP=2 needs four processes and runs only on machines with at least four cores.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.engines.conftest import FAMILIES, tiny_hf_config, tiny_hf_model

pytest.importorskip("megatron.core")

from moe_adapt.engines.megatron.hf_arch import read_hf_arch
from moe_adapt.engines.megatron.mapping import (
    EXPERT_LAYOUTS,
    MegatronShard,
    hf_to_megatron,
    megatron_to_hf,
)
from moe_adapt.engines.megatron.model import (
    build_gpt_model,
    current_shard,
    expert_layout,
    load_megatron_state,
    transformer_config_from_hf,
)
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

REL_TOL = 1e-5
VOCAB = 128  # tensor parallel splits the vocabulary evenly (conftest's 101 is prime)
TP_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "qwen2_moe_dense_tied")  # the last: dense FFN, tied
BATCH, SEQ = 2, 24  # SEQ divisible by TP: sequence parallel splits it
WORLD = 2


def _ids_BT() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _labels_BT() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _all_shards(tp: int, ep: int, etp: int) -> list[MegatronShard]:
    return [
        MegatronShard(t, tp, e, ep, x, etp) for t, e, x in itertools.product(range(tp), range(ep), range(etp))
    ]


# -- mapping only ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", EXPERT_LAYOUTS)
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize(
    "sizes", [(2, 1, 1), (2, 1, 2), (2, 2, 1), (1, 2, 2)], ids=lambda s: "tp{}-ep{}-etp{}".format(*s)
)
def test_gathered_shards_are_bit_exact(name: str, layout: str, sizes: tuple[int, int, int]) -> None:
    hf_model = tiny_hf_model(name, vocab_size=VOCAB)
    config, original = hf_model.config, hf_model.state_dict()
    tp, ep, etp = sizes
    shards = [
        (shard, hf_to_megatron(original, config, expert_layout=layout, **dataclasses.asdict(shard)))
        for shard in _all_shards(tp, ep, etp)
    ]
    back = megatron_to_hf(shards, config)
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    hf_model.load_state_dict(back, strict=True)


def test_tensor_parallel_slices() -> None:
    """Rank 1 of TP=2 (and ETP=2) holds exactly the rows/columns the module docstring names."""
    config = tiny_hf_config("qwen2_moe", vocab_size=VOCAB)
    arch = read_hf_arch(config)
    hf = tiny_hf_model("qwen2_moe", vocab_size=VOCAB).state_dict()
    mc = hf_to_megatron(hf, config, tp_rank=1, tp_size=2, etp_rank=1, etp_size=2)
    d, r = arch.head_dim, arch.heads_per_group
    layer, prefix = "model.layers.0.", "decoder.layers.0."
    # linear_qkv rank 1 = query group 1: its R query heads, then its key head, then its value head.
    q_group1 = hf[layer + "self_attn.q_proj.weight"][r * d : 2 * r * d]
    k_group1 = hf[layer + "self_attn.k_proj.weight"][d : 2 * d]
    v_group1 = hf[layer + "self_attn.v_proj.weight"][d : 2 * d]
    qkv = mc[prefix + "self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, torch.cat([q_group1, k_group1, v_group1]))
    bias = hf[layer + "self_attn.q_proj.bias"][r * d : 2 * r * d]
    assert torch.equal(mc[prefix + "self_attention.linear_qkv.bias"][: r * d], bias)
    # linear_proj rank 1 = the input columns of query heads R ... 2R-1.
    o_proj = hf[layer + "self_attn.o_proj.weight"]
    assert torch.equal(mc[prefix + "self_attention.linear_proj.weight"], o_proj[:, r * d : 2 * r * d])
    # SwiGLU fc1 rank 1 = [second half of gate; second half of up], fc2 the matching columns.
    s = arch.shared_expert_size // 2
    gate, up = (hf[f"{layer}mlp.shared_expert.{p}_proj.weight"] for p in ("gate", "up"))
    assert torch.equal(mc[prefix + "mlp.shared_experts.linear_fc1.weight"], torch.cat([gate[s:], up[s:]]))
    down = hf[layer + "mlp.shared_expert.down_proj.weight"]
    assert torch.equal(mc[prefix + "mlp.shared_experts.linear_fc2.weight"], down[:, s:])
    i = arch.moe_ffn_size // 2
    gate_up_2IH = hf[layer + "mlp.experts.gate_up_proj"][5]
    expert = prefix + "mlp.experts.local_experts.5."
    want = torch.cat([gate_up_2IH[i : 2 * i], gate_up_2IH[3 * i :]])
    assert torch.equal(mc[expert + "linear_fc1.weight"], want)
    assert torch.equal(mc[expert + "linear_fc2.weight"], hf[layer + "mlp.experts.down_proj"][5][:, i:])
    # Vocab-parallel embedding and output layer: rows V/2 ... V-1. Replicated: norms, router, gate.
    assert torch.equal(mc["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][VOCAB // 2 :])
    assert torch.equal(mc["output_layer.weight"], hf["lm_head.weight"][VOCAB // 2 :])
    for hf_key, mc_key in [
        ("input_layernorm.weight", "input_layernorm.weight"),
        ("mlp.gate.weight", "mlp.router.weight"),
        ("mlp.shared_expert_gate.weight", "mlp.shared_experts.gate_weight"),
    ]:
        assert mc[prefix + mc_key] is hf[layer + hf_key]


def test_grouped_layout_is_what_groupedmlp_reads() -> None:
    """GroupedMLP views weight1 as [N, H, 2It] and weight2 as [N, It, H]: expert n's fc1/fc2 transposed."""
    config = tiny_hf_config("mixtral", vocab_size=VOCAB)
    arch = read_hf_arch(config)
    hf = tiny_hf_model("mixtral", vocab_size=VOCAB).state_dict()
    n_local, h, i = arch.num_experts // 2, arch.hidden_size, arch.moe_ffn_size
    mc = hf_to_megatron(hf, config, ep_rank=1, ep_size=2, expert_layout="grouped")
    weight1, weight2 = mc["decoder.layers.1.mlp.experts.weight1"], mc["decoder.layers.1.mlp.experts.weight2"]
    assert weight1.shape == (h, n_local * 2 * i) and weight2.shape == (n_local * i, h)
    gate_up_E2IH = hf["model.layers.1.mlp.experts.gate_up_proj"]
    down_EHI = hf["model.layers.1.mlp.experts.down_proj"]
    for n in range(n_local):
        assert torch.equal(weight1.view(n_local, h, -1)[n], gate_up_E2IH[n_local + n].T)
        assert torch.equal(weight2.view(n_local, -1, h)[n], down_EHI[n_local + n].T)
    te = hf_to_megatron(hf, config, expert_layout="te_grouped")
    assert torch.equal(te["decoder.layers.1.mlp.experts.linear_fc1.weight7"], gate_up_E2IH[7])
    assert torch.equal(te["decoder.layers.1.mlp.experts.linear_fc2.weight7"], down_EHI[7])


@pytest.mark.parametrize(
    ("name", "overrides", "kwargs", "match"),
    [
        ("mixtral", {}, dict(tp_size=2), r"tensor_parallel=2 .* vocab_size \(101\)"),
        ("mixtral", dict(vocab_size=VOCAB), dict(tp_size=4), r"num_key_value_heads \(2\)"),
        ("qwen3_moe", dict(vocab_size=VOCAB), dict(etp_size=3), r"expert_tensor_parallel=3 .* \(32\)"),
        ("qwen2_moe", dict(vocab_size=VOCAB), dict(tp_size=2, tp_rank=2), r"tp_rank=2 is out of range"),
        ("qwen2_moe", {}, dict(expert_layout="fused"), r"expert_layout='fused' is invalid"),
    ],
)
def test_refused_shards_name_the_setting(
    name: str, overrides: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    hf_model = tiny_hf_model(name, **overrides)
    with pytest.raises(MoEAdaptError, match=match):
        hf_to_megatron(hf_model.state_dict(), hf_model.config, **kwargs)


def test_gather_names_missing_ranks() -> None:
    config = tiny_hf_config("mixtral", vocab_size=VOCAB)
    sd = tiny_hf_model("mixtral", vocab_size=VOCAB).state_dict()
    rank0 = hf_to_megatron(sd, config, tp_size=2, ep_size=2)
    with pytest.raises(MoEAdaptError, match=r"missing tp_rank=1, ep_rank=1/etp_rank=0"):
        megatron_to_hf([(MegatronShard(tp_size=2, ep_size=2), rank0)], config)


def test_shard_passed_as_whole_model_is_refused() -> None:
    config = tiny_hf_config("mixtral", vocab_size=VOCAB)
    sd = tiny_hf_model("mixtral", vocab_size=VOCAB).state_dict()
    rank1 = hf_to_megatron(sd, config, ep_rank=1, ep_size=2, expert_layout="grouped")
    with pytest.raises(
        MoEAdaptError, match=r"mlp\.experts \(fc1\) has shape \(8, 96, 64\), expected \(8, 192, 64\)"
    ):
        megatron_to_hf(rank1, config)


def test_config_refuses_what_cannot_be_built() -> None:
    config = tiny_hf_config("qwen2_moe", vocab_size=VOCAB)
    with pytest.raises(
        MoEAdaptConfigError, match=r"grouped_gemm=True is invalid with params_dtype=torch.float32"
    ):
        transformer_config_from_hf(config, grouped_gemm=True)
    odd_shared = tiny_hf_config("qwen2_moe", vocab_size=VOCAB, shared_expert_intermediate_size=45)
    with pytest.raises(MoEAdaptConfigError, match=r"shared_expert_intermediate_size \(45\)"):
        transformer_config_from_hf(odd_shared, tensor_parallel=2)
    with pytest.raises(
        MoEAdaptConfigError, match=r"sequence_parallel=True is invalid with tensor_parallel=1"
    ):
        transformer_config_from_hf(config, sequence_parallel=True)
    assert transformer_config_from_hf(config, tensor_parallel=2).sequence_parallel


# -- grouped GEMM in one process ------------------------------------------------------------------
def _fp32_grouped_model(hf_model: Any, **config_kwargs: Any) -> torch.nn.Module:
    """A fp32 GroupedMLP model for the exact reference (the product refuses fp32 grouped GEMM)."""
    from tests.engines.megatron_cpu import allow_fp32_grouped_mlp

    config = transformer_config_from_hf(hf_model.config, **config_kwargs)
    config = dataclasses.replace(config, moe_grouped_gemm=True)
    model = build_gpt_model(hf_model.config, config=config, parallel_output=False)
    assert allow_fp32_grouped_mlp(model) == sum(read_hf_arch(hf_model.config).moe_layers)
    assert expert_layout(config) == "grouped"
    return model


def _logits(model: torch.nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids_BT, torch.arange(ids_BT.shape[1]).expand_as(ids_BT), attention_mask=None)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_grouped_gemm_logits_match_hf(megatron_cpu: None, name: str) -> None:
    hf_model = tiny_hf_model(name, vocab_size=VOCAB)
    model = _fp32_grouped_model(hf_model)
    load_megatron_state(
        model, hf_to_megatron(hf_model.state_dict(), hf_model.config, expert_layout="grouped")
    )
    ids_BT = _ids_BT()
    with torch.no_grad():
        ref_BTV = hf_model(ids_BT).logits
    rel = _relative(_logits(model.eval(), ids_BT), ref_BTV)
    print(f"grouped GEMM {name}: max |diff| / max |hf| = {rel:.3e}")
    assert rel < REL_TOL
    back = megatron_to_hf(model.state_dict(), hf_model.config)
    for key, tensor in hf_model.state_dict().items():
        assert torch.equal(back[key], tensor), key


def test_grouped_gemm_bf16_matches_sequential(megatron_cpu: None) -> None:
    """The product path (bf16, no fp32 override): grouped and sequential experts agree."""
    hf_model = tiny_hf_model("qwen2_moe", vocab_size=VOCAB).to(torch.bfloat16)
    logits = {}
    for grouped in (False, True):
        model = build_gpt_model(
            hf_model.config, params_dtype=torch.bfloat16, grouped_gemm=grouped, parallel_output=False
        )
        layout = expert_layout(model.config)
        load_megatron_state(
            model, hf_to_megatron(hf_model.state_dict(), hf_model.config, expert_layout=layout)
        )
        logits[layout] = _logits(model.eval(), _ids_BT()).float()
    rel = _relative(logits["grouped"], logits["sequential"])
    print(f"bf16 grouped vs sequential: max |diff| / max |sequential| = {rel:.3e}")
    assert rel < 2e-2  # the two differ only by bf16 rounding in the expert GEMMs (0 on this CPU)


# -- two processes: tensor parallel ---------------------------------------------------------------
def _reinit(tp: int, ep: int, etp: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp
    )
    model_parallel_cuda_manual_seed(1234)


def _sharded_model(
    name: str, tp: int, ep: int, etp: int, grouped: bool = False, dispatcher: str = "alltoall", **kwargs: Any
) -> Any:
    """(model, hf_config) of this rank: built for (tp, ep, etp) and loaded with this rank's shard."""
    _reinit(tp, ep, etp)
    hf_model = tiny_hf_model(name, vocab_size=VOCAB)
    sizes = dict(tensor_parallel=tp, expert_parallel=ep, expert_tensor_parallel=etp, dispatcher=dispatcher)
    if grouped:
        model = _fp32_grouped_model(hf_model, **sizes)
    else:
        model = build_gpt_model(hf_model.config, **sizes, **kwargs)
    shard = current_shard()
    assert (shard.tp_size, shard.ep_size, shard.etp_size) == (tp, ep, etp)
    layout = expert_layout(model.config)
    mapped = hf_to_megatron(
        hf_model.state_dict(), hf_model.config, expert_layout=layout, **dataclasses.asdict(shard)
    )
    load_megatron_state(model, mapped)
    return model, hf_model.config


def _train_step(name: str) -> dict[str, Any]:
    """TP=2 (sequence parallel) training step; gradients reduced as megatron's DDP/finalize would."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    model, _ = _sharded_model(name, tp=2, ep=1, etp=1, parallel_output=True)
    model.train()
    ids_BT = _ids_BT()
    loss_BT = model(ids_BT, torch.arange(SEQ).expand_as(ids_BT), attention_mask=None, labels=_labels_BT())
    loss = loss_BT.mean()
    loss.backward()
    grads: dict[str, torch.Tensor] = {}
    for key, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if ".mlp.experts." in key:  # ETP=1: each TP rank ran its own tokens through whole experts
            dist.all_reduce(grad, group=parallel_state.get_expert_data_parallel_group())
        elif getattr(param, "sequence_parallel", False) or "q_layernorm" in key or "k_layernorm" in key:
            dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        grads[key] = grad
    return {"loss": loss.detach(), "shard": dataclasses.asdict(current_shard()), "grads": grads}


def _two_rank_cases(ids_BT: torch.Tensor) -> dict[str, Any]:
    """Everything the two-process run computes (see the module docstring)."""
    result: dict[str, Any] = {}
    for name in TP_FAMILIES:
        model, _ = _sharded_model(name, tp=2, ep=1, etp=1, parallel_output=False)
        result[f"tp2/{name}"] = _logits(model.eval(), ids_BT)
    model, _ = _sharded_model("qwen2_moe", tp=2, ep=1, etp=2, parallel_output=False)
    result["tp2-etp2/qwen2_moe"] = _logits(model.eval(), ids_BT)
    model, _ = _sharded_model("qwen3_moe", tp=2, ep=1, etp=2, grouped=True)
    result["tp2-etp2-grouped/qwen3_moe"] = _logits(model.eval(), ids_BT)
    model, _ = _sharded_model("qwen2_moe", tp=2, ep=2, etp=1, parallel_output=False)
    result["tp2-ep2/qwen2_moe"] = _logits(model.eval(), ids_BT)
    result["tp2-ep2/state"] = (dataclasses.asdict(current_shard()), dict(model.state_dict()))
    result["train/qwen2_moe"] = _train_step("qwen2_moe")
    return result


def _four_rank_cases(ids_BT: torch.Tensor) -> dict[str, Any]:
    """TP=2 x EP=2 x ETP=2 on four ranks, both dispatchers, sequential and grouped experts."""
    result: dict[str, Any] = {}
    for dispatcher, grouped in itertools.product(("alltoall", "allgather"), (False, True)):
        case = f"tp2-ep2-etp2-{dispatcher}{'-grouped' if grouped else ''}/qwen2_moe"
        model, _ = _sharded_model("qwen2_moe", 2, 2, 2, grouped, dispatcher=dispatcher, parallel_output=False)
        result[case] = _logits(model.eval(), ids_BT)
        result[case.replace("/", "/state/")] = (dataclasses.asdict(current_shard()), dict(model.state_dict()))
    return result


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from tests.engines.megatron_cpu import megatron_on_cpu

    torch.set_num_threads(1)
    with megatron_on_cpu(rank=rank, world_size=world, port=port, tensor_parallel=2):
        cases = _two_rank_cases if world == 2 else _four_rank_cases
        result = cases(_ids_BT())
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _spawn(out_dir: Path, world: int = WORLD, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from tests.engines.megatron_cpu import free_port

    context: Any = mp.spawn(_worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.terminate()
            pytest.fail(f"tensor-parallel workers did not finish in {timeout_s:.0f} s")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What both ranks of the two-process run computed (one spawn for all tensor-parallel tests)."""
    return _spawn(tmp_path_factory.mktemp("tp"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [f"tp2/{name}" for name in TP_FAMILIES]
    + ["tp2-etp2/qwen2_moe", "tp2-etp2-grouped/qwen3_moe", "tp2-ep2/qwen2_moe"],
)
def test_tensor_parallel_logits_match_hf(tp_results: list[dict[str, Any]], case: str) -> None:
    name = case.split("/")[1]
    hf_model = tiny_hf_model(name, vocab_size=VOCAB)
    with torch.no_grad():
        ref_BTV = hf_model(_ids_BT()).logits
    for rank, result in enumerate(tp_results):
        rel = _relative(result[case], ref_BTV)
        print(f"{case} rank {rank}: max |diff| / max |hf| = {rel:.3e}")
        assert result[case].shape == ref_BTV.shape
        assert rel < REL_TOL, f"{case} rank {rank}: relative logit difference {rel:.3e}"


@pytest.mark.slow
def test_tensor_x_expert_parallel_states_gather_to_hf(tp_results: list[dict[str, Any]]) -> None:
    """The loaded TP=2 x EP=2 models' own state dicts gather back to the HF tensors bit for bit."""
    hf_model = tiny_hf_model("qwen2_moe", vocab_size=VOCAB)
    shards = [(MegatronShard(**r["tp2-ep2/state"][0]), r["tp2-ep2/state"][1]) for r in tp_results]
    assert {(s.tp_rank, s.ep_rank) for s, _ in shards} == {(0, 0), (1, 1)}
    back = megatron_to_hf(shards, hf_model.config)
    for key, tensor in hf_model.state_dict().items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.slow
def test_tensor_parallel_training_step_matches_hf(tp_results: list[dict[str, Any]]) -> None:
    """TP=2 with sequence parallel trains: same loss as HF, and (after megatron's gradient
    reductions) the gathered gradients equal HF's."""
    hf_model = tiny_hf_model("qwen2_moe", vocab_size=VOCAB)
    logits_BTV = hf_model(_ids_BT()).logits
    loss = F.cross_entropy(logits_BTV.flatten(0, 1), _labels_BT().flatten())
    loss.backward()
    ref_grads = {k: p.grad for k, p in hf_model.named_parameters()}
    for result in tp_results:
        got = result["train/qwen2_moe"]["loss"]
        print(f"train loss: megatron {got.item():.7f}, hf {loss.item():.7f}")
        torch.testing.assert_close(got, loss.detach(), rtol=REL_TOL, atol=0)
    shards = [
        (MegatronShard(**r["train/qwen2_moe"]["shard"]), r["train/qwen2_moe"]["grads"]) for r in tp_results
    ]
    grads = megatron_to_hf(shards, hf_model.config)
    worst = max(_relative(grads[k], g) for k, g in ref_grads.items())
    print(f"train grads: max over tensors of max |diff| / max |hf| = {worst:.3e}")
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="four gloo processes; about 45 s on 2 cores")
def test_tp2_ep2_etp2_on_four_ranks(tmp_path: Path) -> None:
    """Tensor, expert and expert-tensor parallel at once: logits match HF and the shards gather back."""
    results = _spawn(tmp_path, world=4, timeout_s=300.0)
    hf_model = tiny_hf_model("qwen2_moe", vocab_size=VOCAB)
    with torch.no_grad():
        ref_BTV = hf_model(_ids_BT()).logits
    for case in (k for k in results[0] if "/state/" not in k):
        rel = max(_relative(result[case], ref_BTV) for result in results)
        print(f"{case}: max over ranks of max |diff| / max |hf| = {rel:.3e}")
        assert rel < REL_TOL, case
        state = case.replace("/", "/state/")
        back = megatron_to_hf([(MegatronShard(**r[state][0]), r[state][1]) for r in results], hf_model.config)
        for key, tensor in hf_model.state_dict().items():
            assert torch.equal(back[key], tensor), (case, key)
