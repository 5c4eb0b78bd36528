"""The training plan (moe_adapt.engines.plan): parameter counts and memory per rank on tiny configs
counted by hand, the refusal of a plan the device cannot hold and its override."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from moe_adapt.engines import plan as plan_mod
from moe_adapt.engines.hf.config import HFConfig
from moe_adapt.engines.megatron.config import MegatronConfig
from moe_adapt.engines.plan import Layout, count_params, memory_per_rank, plan_training
from moe_adapt.errors import MoEAdaptConfigError

# vocab 100, hidden 8, 2 heads of 4 with 1 key/value head: attention q 64 + k 32 + v 32 + o 64 = 192
ATTN = dict(vocab_size=100, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4)


def tiny(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **ATTN, **kw)


def moe_config():
    # per layer: attention 192 + q/k norms 4 + 4 + router 4x8 = 32 + experts 4 x 3x8x4 = 384 + norms 16
    # = 632; two layers 1264, tied embeddings 800, final norm 8: 2072 in all, 768 in experts
    return tiny(
        "qwen3_moe",
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=4,
        intermediate_size=16,
        tie_word_embeddings=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def test_counts_a_dense_model():
    # embeddings 800 + head 800 + 2 x (attention 192 + MLP 3x8x16 = 384 + norms 16) + final norm 8
    p = count_params(tiny("llama", num_hidden_layers=2, intermediate_size=16, tie_word_embeddings=False))
    assert (p.total, p.active, p.experts, p.num_experts) == (2792, 2792, 0, 0)


def test_counts_an_moe_model_total_and_active():
    p = count_params(moe_config())
    assert (p.total, p.experts, p.num_experts, p.top_k) == (2072, 768, 4, 2)
    assert p.active == 2072 - 768 + 768 * 2 // 4 == 1688
    assert (p.root, p.largest_layer) == (808, 632)
    assert p.matrices == 800 + 2 * 192  # embeddings and attention: what tensor parallel splits


def test_counts_mixtral_experts():
    # embeddings 800 + head 800 + attention 192 + router 32 + experts 4 x 3x8x4 = 384 + norms 16 + 8
    p = count_params(
        tiny(
            "mixtral",
            num_hidden_layers=1,
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=4,
            tie_word_embeddings=False,
        )
    )
    assert (p.total, p.experts, p.active) == (2232, 384, 2232 - 384 + 192)


@pytest.mark.parametrize(
    ("dtype", "layout", "expected"),
    [
        # weights, gradients, optimizer (AdamW's two moments in the parameter dtype), extra
        ("float32", Layout("hf"), (8288, 8288, 16576, {})),
        ("bfloat16", Layout("hf"), (4144, 4144, 8288, {})),
        # DDP replicates; its gradient buckets are a second copy of the gradients
        ("float32", Layout("hf", 2, "ddp"), (8288, 16576, 16576, {})),
        # FSDP2 shards by 2, plus the root (808) and two of the largest layer (632) gathered
        ("float32", Layout("hf", 2, "fsdp2"), (4144, 4144, 8288, {"fsdp2 gathered": (808 + 2 * 632) * 4})),
        # megatron EP=2: 1304 non-expert + 384 experts per rank, AdamW on every rank
        ("float32", Layout("megatron", 2, "megatron", expert_parallel=2), (6752, 6752, 13504, {})),
        # + distributed optimizer in bf16: fp32 moments, main params and their grads (16 bytes) on
        # the dense half (652, two data-parallel ranks) and the local experts whole (one expert-dp rank)
        (
            "bfloat16",
            Layout("megatron", 2, "megatron", expert_parallel=2, distributed_optimizer=True),
            (3376, 3376, (652 + 384) * 16, {}),
        ),
        # TP=2 splits the 1184 matrix weights, keeps 120 1-d/router weights whole; fp32 keeps no
        # master copy: 8 bytes of moments per shard parameter, experts over two expert-dp ranks
        (
            "float32",
            Layout("megatron", 2, "megatron", tensor_parallel=2, distributed_optimizer=True),
            ((592 + 120 + 768) * 4, (592 + 120 + 768) * 4, (712 + 384) * 8, {}),
        ),
    ],
)
def test_memory_per_rank(dtype, layout, expected):
    m = memory_per_rank(count_params(moe_config()), dtype, layout)
    assert (m.weights, m.gradients, m.optimizer, m.extra) == expected
    assert m.total == sum(expected[:3]) + sum(expected[3].values())


@pytest.fixture
def moe_dir(tmp_path: Path) -> Path:
    moe_config().save_pretrained(tmp_path / "moe")  # config.json only: the plan loads no weights
    return tmp_path / "moe"


def test_plan_from_config_json(moe_dir):
    plan = plan_training("cpt", HFConfig(), moe_dir, steps=10, batch_size=4, seq_len=32, world_size=1)
    d = plan.as_dict()
    assert (d["params_total"], d["params_active"], d["num_experts"], d["top_k"]) == (2072, 1688, 4, 2)
    assert d["bytes_per_rank"] == {"weights": 8288, "gradients": 8288, "optimizer": 16576, "total": 33152}
    assert (d["tokens_per_step"], d["steps"], d["total_tokens"]) == (128, 10, 1280)
    assert d["logits_bytes_per_rank"] == 4 * 32 * 100 * 4 and d["activations"] == "not counted"
    anchored = plan_training(
        "cpt", HFConfig(l2_anchor_coef=0.1), moe_dir, steps=1, batch_size=1, seq_len=1
    ).memory
    assert anchored.extra == {"l2 anchor": 8288}
    frozen = plan_training(
        "token_kd",
        HFConfig(dtype="bfloat16", kl_anchor_coef=0.1, reference=str(moe_dir)),
        moe_dir,
        steps=1,
        batch_size=1,
        seq_len=1,
        teacher=moe_dir,
    ).memory
    assert frozen.extra == {"kl reference": 2072 * 2, "kd teacher": 2072 * 2}  # whole, in engine.dtype
    megatron = plan_training(
        "cpt", MegatronConfig(expert_parallel=2), moe_dir, steps=1, batch_size=2, seq_len=1, world_size=2
    )
    assert megatron.layout.engine == "megatron" and megatron.memory.weights == 6752


def test_refuses_a_plan_the_device_cannot_hold(moe_dir, monkeypatch, caplog):
    monkeypatch.setattr(plan_mod, "available_memory_bytes", lambda: 10_000)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    plan = plan_training("cpt", HFConfig(), moe_dir, steps=10, batch_size=4, seq_len=32)
    with caplog.at_level(logging.INFO), pytest.raises(MoEAdaptConfigError) as err:
        plan_mod.announce(plan, check=True, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert "needs 32.38 KiB per rank" in msg and "cpu available has 9.77 KiB" in msg
    assert "2.07K parameters" in msg and "engine.check_memory=false" in msg
    assert "training plan" in caplog.text  # the plan is logged before the refusal


def test_check_memory_false_trains_anyway(moe_dir, monkeypatch, caplog):
    monkeypatch.setattr(plan_mod, "available_memory_bytes", lambda: 10_000)
    plan = plan_training("cpt", HFConfig(check_memory=False), moe_dir, steps=10, batch_size=4, seq_len=32)
    with caplog.at_level(logging.INFO):
        plan_mod.announce(plan, check=False, device="cpu")
    assert "training anyway (engine.check_memory=false)" in caplog.text
    assert plan.available == 10_000 and plan.needed == 33152


def test_cpu_processes_share_the_memory(moe_dir, monkeypatch):
    monkeypatch.setattr(plan_mod, "available_memory_bytes", lambda: 40_000)  # one rank needs 24,864 bytes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    plan = plan_training(
        "cpt", HFConfig(parallel="fsdp2"), moe_dir, steps=1, batch_size=2, seq_len=4, world_size=2
    )
    with pytest.raises(MoEAdaptConfigError, match=r"x 2 processes"):
        plan.check("cpu")


def test_check_memory_is_not_part_of_a_stage_fingerprint():
    from omegaconf import OmegaConf

    from moe_adapt.runner import _stage_settings

    on, off = (OmegaConf.create({"engine": {"lr": 0.1, "check_memory": v}}) for v in (True, False))
    assert _stage_settings(on, ("engine",)) == _stage_settings(off, ("engine",)) == {"engine": {"lr": 0.1}}


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture
def moe_weights(tmp_path: Path) -> Path:
    """The tiny MoE of moe_config() with random weights (LoRA and QLoRA load them)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config()).save_pretrained(tmp_path / "moe_w")
    return tmp_path / "moe_w"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lora_plan_counts_the_frozen_base_and_the_fp32_adapters(moe_weights, dtype):
    """The base's P parameters hold weights only; the A adapters weights, gradients and AdamW's two
    moments, all in fp32 (peft's adapters), whatever engine.dtype. A counted by hand, then checked
    against the peft model the engine trains."""
    pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from moe_adapt.engines.lora import LoRAConfig, wrap

    lora = LoRAConfig(rank=2, target_modules=ATTENTION, experts=True)
    # attention per layer: q 2x(8+8) + k 2x(8+4) + v 2x(8+4) + o 2x(8+8) = 112; experts per layer:
    # gate_up 4x8x8 -> 2x4x(8+8) = 128, down 4x8x4 -> 2x4x(8+4) = 96; two layers
    a, a_experts, p = 2 * 112 + 2 * (128 + 96), 2 * (128 + 96), 2072
    b = {"float32": 4, "bfloat16": 2}[dtype]
    cfg = HFConfig(dtype=dtype)
    full = plan_training("sft", cfg, moe_weights, steps=2, batch_size=2, seq_len=8)
    plan = plan_training("sft", cfg, moe_weights, steps=2, batch_size=2, seq_len=8, lora=lora)
    m = plan.memory
    assert (full.memory.weights, full.memory.gradients, full.memory.optimizer) == (p * b, p * b, 2 * p * b)
    assert (m.weights, m.gradients, m.optimizer) == (p * b + 4 * a, 4 * a, 8 * a)
    assert full.memory.total - m.total == (4 * p * b) - (p * b + 16 * a)  # what LoRA saves
    assert plan.trainable == a and plan.as_dict()["params_trainable"] == a
    assert plan.adapters is not None and plan.adapters.active == a - a_experts + a_experts * 2 // 4
    assert plan.flops_per_token == 4 * 1688 + 6 * plan.adapters.active and full.flops_per_token == 6 * 1688
    # the model the engine trains holds exactly that
    model = wrap(AutoModelForCausalLM.from_pretrained(moe_weights, dtype=getattr(torch, dtype)), lora)
    trained = [q for q in model.parameters() if q.requires_grad]
    assert sum(q.numel() for q in trained) == a and all(q.dtype == torch.float32 for q in trained)
    assert sum(q.numel() * q.element_size() for q in model.parameters()) == m.weights
    anchored = plan_training(
        "seq_kd", HFConfig(l2_anchor_coef=0.1), moe_weights, steps=1, batch_size=1, seq_len=1, lora=lora
    )
    assert anchored.memory.extra == {"l2 anchor": 4 * a}  # a copy of the adapters, not of the base
    ddp = plan_training("sft", cfg, moe_weights, steps=1, batch_size=2, seq_len=1, world_size=2, lora=lora)
    assert ddp.memory.gradients == 8 * a  # DDP's buckets hold the adapters' gradients only
    assert "lora        r=2: 672 adapter parameters train in fp32" in plan.describe()


def test_a_qlora_plan_holds_what_bitsandbytes_holds(moe_weights):
    """QLoRA's base: the attention's nn.Linear weights (384 of the 2072 parameters) in NF4 (half a byte
    each, a uint8 scale per 64 and an fp32 one per 256 blocks: 16 + 1 + 4 bytes for a 32-element
    weight), the rest upcast to fp32; compared with the bytes the loaded 4-bit model holds."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import torch

    from moe_adapt.engines.lora import LoRAConfig, load_quantized, wrap

    lora = LoRAConfig(rank=2, target_modules=ATTENTION, experts=True, quantize="4bit")
    plan = plan_training(
        "sft", HFConfig(dtype="bfloat16"), moe_weights, steps=1, batch_size=1, seq_len=8, lora=lora
    )
    a = 672
    # per layer: q, o 64 elements -> 32 + 1 + 4 bytes; k, v 32 elements -> 16 + 1 + 4 bytes
    nf4 = 2 * (2 * 37 + 2 * 21)
    assert plan.adapters is not None and (plan.adapters.quantized, plan.adapters.quantized_bytes) == (
        384,
        nf4,
    )
    assert plan.memory.weights == nf4 + (2072 - 384) * 4 + 4 * a
    assert (plan.memory.gradients, plan.memory.optimizer) == (4 * a, 8 * a)
    model = wrap(load_quantized(moe_weights, torch.bfloat16, torch.device("cpu")), lora)
    held = 0
    for q in model.parameters():
        held += q.numel() * q.element_size()
        state = getattr(q, "quant_state", None)
        if state is not None:  # the scales: uint8 per block, fp32 per 256 blocks
            held += state.absmax.numel() * state.absmax.element_size()
            held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert held == plan.memory.weights


def test_lora_plan_refuses_fsdp2_and_megatron(moe_weights):
    from moe_adapt.engines.lora import LoRAConfig

    lora = LoRAConfig(rank=2, target_modules=ATTENTION)
    with pytest.raises(MoEAdaptConfigError, match=r"engine.parallel='fsdp2' is invalid: LoRA trains"):
        plan_training(
            "sft",
            HFConfig(parallel="fsdp2"),
            moe_weights,
            steps=1,
            batch_size=2,
            seq_len=1,
            world_size=2,
            lora=lora,
        )
    with pytest.raises(MoEAdaptConfigError, match=r"lora.rank=2 is invalid with engine=megatron"):
        plan_training("sft", MegatronConfig(), moe_weights, steps=1, batch_size=1, seq_len=1, lora=lora)
    off = plan_training("sft", HFConfig(), moe_weights, steps=1, batch_size=1, seq_len=1, lora=LoRAConfig())
    assert off.adapters is None and off.trainable == 2072  # rank 0: every weight trains
