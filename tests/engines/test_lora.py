"""LoRA / QLoRA students (moe_adapt/engines/lora.py): the merge is exact, only adapters train, a distill
phase with LoRA writes a plain HF model, and bad settings fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from moe_adapt.engines import build_engine
from moe_adapt.engines.hf import HFConfig, HFEngine
from moe_adapt.engines.lora import LoRAConfig, merged
from moe_adapt.engines.megatron.config import MegatronConfig
from moe_adapt.errors import MoEAdaptConfigError
from tests.distill.conftest import build_lm


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm(tmp_path_factory.mktemp("dense"), "llama")


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm(tmp_path_factory.mktemp("moe"), "qwen3_moe")


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(seed))


def _train(path: Path, lora: LoRAConfig, steps: int = 3) -> HFEngine:
    engine = HFEngine(path, HFConfig(lr=1e-2, warmup_steps=0, decay_steps=steps), lora=lora)
    for i in range(steps):
        engine.step(_batch(i))
    return engine


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_merged_model_equals_the_adapter_model_and_only_adapters_train(
    family: str, dense: Path, moe: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    path = dense if family == "dense" else moe
    lora = LoRAConfig(rank=4, alpha=8.0, experts=family == "moe")
    base = AutoModelForCausalLM.from_pretrained(path).state_dict()
    engine = _train(path, lora)
    trainable = [n for n, p in engine.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if family == "moe":  # the fused 3-D experts are adapted, the router is not
        assert any(".experts." in n for n in trainable)
    # the base weights inside the adapter model are untouched by training
    for name, value in engine.model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        torch.testing.assert_close(value, base[key], rtol=0, atol=0, msg=name)
    # the adapters moved (lora_B starts at zero)
    assert any(p.abs().sum() > 0 for n, p in engine.model.named_parameters() if "lora_B" in n)

    out = tmp_path / "phase" / "model"
    engine.save_hf(out)
    adapter = tmp_path / "phase" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # vanilla transformers, no peft
    assert not any("lora" in k for k in plain.state_dict())
    assert (out / "tokenizer.json").is_file()
    x = _batch(99)
    engine.model.eval()
    with torch.no_grad():
        want = engine.model(input_ids=x).logits
        got = plain(input_ids=x).logits
        again = merged(path, adapter, torch.float32)(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=0, atol=1e-5)
    assert (got - AutoModelForCausalLM.from_pretrained(path)(input_ids=x).logits).abs().max() > 1e-4


def test_qlora_4bit_trains_on_the_cpu_and_saves_full_precision(dense: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    engine = _train(dense, LoRAConfig(rank=4, quantize="4bit"), steps=2)
    assert (
        type(engine.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__
        == "Linear4bit"
    )
    engine.save_hf(tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert getattr(plain.config, "quantization_config", None) is None


def test_bad_settings_fail_in_one_line(dense: Path) -> None:
    def fails(match: str, **kw: object) -> None:
        with pytest.raises(MoEAdaptConfigError, match=match) as err:
            LoRAConfig(**kw).validate("distill.seq_kd.lora")  # type: ignore[arg-type]
        assert "\n" not in str(err.value)

    fails(r"distill.seq_kd.lora.rank=-1 is invalid", rank=-1)
    fails(r"distill.seq_kd.lora.alpha=0 is invalid", rank=4, alpha=0)
    fails(r"distill.seq_kd.lora.dropout=1.0 is invalid", rank=4, dropout=1.0)
    fails(r"distill.seq_kd.lora.quantize='8bit' is invalid", rank=4, quantize="8bit")
    fails(r"distill.seq_kd.lora.target_modules=\[\] is invalid", rank=4, target_modules=[])
    with pytest.raises(MoEAdaptConfigError, match="lora.experts=True is invalid: .*dense"):
        HFEngine(dense, HFConfig(), lora=LoRAConfig(rank=2, experts=True))
    with pytest.raises(MoEAdaptConfigError, match="lora.target_modules=.*matches no nn.Linear"):
        HFEngine(dense, HFConfig(), lora=LoRAConfig(rank=2, target_modules=["qkv"]))
    with pytest.raises(MoEAdaptConfigError, match="lora.rank=2 is invalid with engine=megatron: LoRA"):
        build_engine(MegatronConfig(), dense, lora=LoRAConfig(rank=2))


def test_a_checkpoint_restores_the_adapters_and_their_optimizer_state(moe: Path) -> None:
    lora = LoRAConfig(rank=2, experts=True)
    engine = _train(moe, lora, steps=2)
    resumed = HFEngine(moe, HFConfig(lr=1e-2, warmup_steps=0, decay_steps=2), lora=lora)
    resumed.load_state_dict(engine.state_dict())
    for (name, a), (_, b) in zip(
        engine.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    want, got = engine.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert want.keys() == got.keys() and len(want) == sum(p.requires_grad for p in engine.model.parameters())
    for i in want:
        for key in want[i]:
            torch.testing.assert_close(want[i][key], got[i][key], rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 2])
def test_a_stopped_lora_run_resumes_from_its_checkpoint(rank: int, moe: Path, tmp_path: Path) -> None:
    """Through the trainer: a run stopped at step 2 resumes from its checkpoint (adapters, optimizer)
    and ends with a merged model like a run that was never stopped."""
    from transformers import AutoModelForCausalLM

    from moe_adapt.train.callbacks import CheckpointCallback
    from moe_adapt.train.phase import train_into_folder

    lora = LoRAConfig(rank=rank, experts=rank > 0)

    class Batches:
        def __init__(self) -> None:
            self.drawn = 0

        def state_dict(self) -> dict:
            return {"drawn": self.drawn}

        def load_state_dict(self, state: dict) -> None:
            self.drawn = int(state["drawn"])

        def next_batch(self, batch_size: int) -> torch.Tensor:
            self.drawn += 1
            return _batch(self.drawn)

    def run(work: Path, steps: int) -> None:
        torch.manual_seed(0)  # the adapters' initialisation, as run_train_phase seeds it
        engine = HFEngine(moe, HFConfig(lr=1e-2, warmup_steps=0, decay_steps=3), lora=lora)
        callbacks = [CheckpointCallback(work / "checkpoints", 1)]
        kw = dict(max_steps=steps, batch_size=2, work=work, model_dir=work / "model", curves=None)
        train_into_folder("t", engine, Batches(), callbacks, **kw)  # type: ignore[arg-type]

    run(tmp_path / "a", 2)
    run(tmp_path / "a", 3)  # resumes at step 2
    run(tmp_path / "b", 3)
    x = _batch(7)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")(input_ids=x).logits
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model")(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _ddp_worker(rank: int, port: int, model: str, out: str) -> None:

    from moe_adapt import distributed
    from tests.train.test_distributed import _rank_env

    _rank_env(rank, port)
    distributed.init(cuda=False)
    try:
        torch.manual_seed(0)
        lora = LoRAConfig(rank=2, experts=True)
        engine = HFEngine(model, HFConfig(lr=1e-2, warmup_steps=0, decay_steps=2, parallel="ddp"), lora=lora)
        for i in range(2):
            engine.step(_batch(i))
        engine.save_hf(Path(out) / "model")
    finally:
        distributed.shutdown()


def test_two_ddp_ranks_train_the_adapters_like_one_process(moe: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.train.test_distributed import _free_port, _spawn

    _spawn(_ddp_worker, (_free_port(), str(moe), str(tmp_path / "ddp")))
    torch.manual_seed(0)
    one = _train(moe, LoRAConfig(rank=2, experts=True), steps=2)
    one.save_hf(tmp_path / "one" / "model")
    x = _batch(9)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "model")(input_ids=x).logits
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model")(input_ids=x).logits
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
