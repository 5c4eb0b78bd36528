"""expert_prune: removes exactly the experts it reports, the result loads in vanilla transformers and
computes what the source computes without those experts; dropping none changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_adapt.checkpoint.hf import HFCheckpoint
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.export.expert_prune import RoutingCounts, choose_experts, moe_layout, prune


def _counts(layers: list[int], seed: int = 0) -> RoutingCounts:
    rng = np.random.default_rng(seed)
    return RoutingCounts(
        layers, {g: rng.integers(0, 100, size=(len(layers), 8)) for g in ("ar", "en")}, "test counts"
    )


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(ids).logits


def test_choose_drops_the_least_used_per_layer_and_reports_mass() -> None:
    counts = {
        "ar": np.array([[50, 0, 30, 20, 0, 0, 0, 0]] * 2),
        "en": np.array([[0, 40, 0, 0, 60, 0, 0, 0]] * 2),
    }
    layout = type("L", (), {"num_experts": 8, "top_k": 2, "blocks": {0: "mlp", 1: "mlp"}})()
    dropped, mass = choose_experts(RoutingCounts([0, 1], counts, "t"), layout, 4)  # type: ignore[arg-type]
    assert dropped == {0: [3, 5, 6, 7], 1: [3, 5, 6, 7]}  # the three unused, then usage 0.1
    assert mass["per_language"] == pytest.approx({"ar": 0.2, "en": 0.0})
    dropped_ar, mass_ar = choose_experts(RoutingCounts([0, 1], counts, "t"), layout, 4, ["ar"])  # type: ignore[arg-type]
    assert dropped_ar == {0: [1, 4, 5, 6], 1: [1, 4, 5, 6]} and mass_ar["per_language"] == {"ar": 0.0}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_prune_removes_what_it_reports_and_loads(
    tmp_path: Path, checkpoints: dict[str, Path], kind: str
) -> None:
    from transformers import AutoModelForCausalLM

    src = checkpoints[kind]
    ckpt = HFCheckpoint(src)
    layout = moe_layout(ckpt)
    ckpt.close()
    dropped, _ = choose_experts(_counts(sorted(layout.blocks)), layout, 3)
    report = prune(src, tmp_path / "pruned", dropped)
    assert report["dropped"] == {str(k): v for k, v in dropped.items()}
    assert report["num_experts"] == {"before": 8, "after": 5}
    before, after = HFCheckpoint(src), HFCheckpoint(tmp_path / "pruned")
    expert_names = [n for n in before.index if ".experts." in n]
    per_expert = len(expert_names) // (8 * len(dropped))
    removed = sum(
        before.info(n).numel
        for n in expert_names
        if int(n.split(".experts.")[1].split(".")[0]) in dropped[int(n.split(".")[2])]
    )
    router_rows = sum(
        3 * before.info(n).shape[1]
        for n in before.index
        if n.endswith("gate.weight") and before.info(n).shape[0] == 8
    )
    assert report["params"]["removed"] == removed + router_rows
    assert len([n for n in after.index if ".experts." in n]) == 5 * per_expert * len(dropped)
    for layer, gone in dropped.items():  # every kept expert is the source's, byte for byte, renumbered
        kept = [e for e in range(8) if e not in gone]
        for new, old in enumerate(kept):
            for n in before.index:
                prefix = f"model.layers.{layer}."
                if n.startswith(prefix) and f".experts.{old}." in n:
                    assert torch.equal(
                        after.get(n.replace(f".experts.{old}.", f".experts.{new}.")), before.get(n)
                    )
        router = next(
            n
            for n in before.index
            if n.startswith(f"model.layers.{layer}.")
            and n.endswith("gate.weight")
            and before.info(n).shape[0] == 8
        )
        assert torch.equal(after.get(router), before.get(router)[kept])
    for n in before.index:  # everything but routed experts and routers: unchanged (the shared expert too)
        if ".experts." not in n and not (n.endswith("gate.weight") and before.info(n).shape[0] == 8):
            assert torch.equal(after.get(n), before.get(n)), n
    before.close()
    after.close()
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    key = "num_local_experts" if kind == "mixtral" else "num_experts"
    assert getattr(model.config, key) == 5


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_prune_nothing_gives_identical_logits(
    tmp_path: Path, checkpoints: dict[str, Path], kind: str
) -> None:
    src = checkpoints[kind]
    ckpt = HFCheckpoint(src)
    layout = moe_layout(ckpt)
    ckpt.close()
    dropped, mass = choose_experts(_counts(sorted(layout.blocks)), layout, 0)
    report = prune(src, tmp_path / "same", dropped)
    assert report["params"]["removed"] == 0 and set(mass["per_language"].values()) == {0.0}
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(tmp_path / "same", ids), _logits(src, ids))


def test_pruned_model_is_the_source_without_those_experts(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    """The pruned model computes what the source computes when its routers may not pick the dropped
    experts (their logits set to -inf): the kept experts and router rows line up after renumbering."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    src = checkpoints["qwen3_moe"]
    dropped = {0: [1, 6], 1: [0, 3]}
    prune(src, tmp_path / "p", dropped)
    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()

    def masked(router: torch.nn.Module, gone: list[int]):
        def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits_TE = F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
            logits_TE[:, gone] = float("-inf")
            top_v_TK, top_i_TK = torch.topk(torch.softmax(logits_TE.float(), dim=-1), router.top_k, dim=-1)
            return logits_TE, (top_v_TK / top_v_TK.sum(-1, keepdim=True)).to(logits_TE.dtype), top_i_TK

        return forward

    for layer, gone in dropped.items():
        router = ref.model.layers[layer].mlp.gate
        router.forward = masked(router, gone)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(_logits(tmp_path / "p", ids), want, rtol=1e-5, atol=1e-5)


def test_bad_input_is_one_line(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    with pytest.raises(
        MoEAdaptError, match=r"expert_prune needs an MoE checkpoint: .* has no routed experts"
    ):
        prune(checkpoints["llama"], tmp_path / "x", {0: [1]})
    ckpt = HFCheckpoint(checkpoints["mixtral"])
    layout = moe_layout(ckpt)
    ckpt.close()
    with pytest.raises(
        MoEAdaptConfigError, match=r"drop_per_layer=7 is invalid: it leaves 1 experts .* \(at most 6\)"
    ):
        choose_experts(_counts([0, 1]), layout, 7)
    with pytest.raises(MoEAdaptConfigError, match=r"languages=\['fr'\] is invalid"):
        choose_experts(_counts([0, 1]), layout, 1, ["fr"])
    with pytest.raises(MoEAdaptError, match="routing of another model"):
        choose_experts(_counts([0, 1, 2]), layout, 1)
    with pytest.raises(MoEAdaptError, match="same number of experts in every MoE layer"):
        prune(checkpoints["mixtral"], tmp_path / "y", {0: [1], 1: [1, 2]})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_router_bias_file_loses_the_dropped_columns(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoints["qwen3_moe"], src)
    doc = {
        "format": "moe_adapt.router_bias/1",
        "routers": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
        "expert_bias_LE": [[float(i) for i in range(8)], [float(10 + i) for i in range(8)]],
    }
    (src / "router_bias.json").write_text(json.dumps(doc))
    prune(src, tmp_path / "p", {0: [0, 7], 1: [2, 3]})
    out = json.loads((tmp_path / "p" / "router_bias.json").read_text())
    assert out["expert_bias_LE"] == [[1.0, 2, 3, 4, 5, 6], [10.0, 11, 14, 15, 16, 17]]
