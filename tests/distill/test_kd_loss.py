"""Token-level KD and SelecTKD against hand computations on a three-word vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from moe_adapt.engines.objectives import TeacherTopK, token_kd_loss
from moe_adapt.errors import MoEAdaptError


def softmax(xs: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(q: list[float], p: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(q, p, strict=True) if a > 0)


STUDENT = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 0.0]]
TEACHER = [[3.0, 0.0, 0.0], [0.0, 0.2, 0.1], [-1.0, 4.0, 0.0]]
LABELS = [0, 2, 1]
MASK = [True, True, False]  # the third position is a prompt token: no loss


def hand(
    alpha: float, t: float, theta: float | None, direction: str = "forward"
) -> tuple[float, float, float]:
    ces, kls = [], []
    for s, q, y, m in zip(STUDENT, TEACHER, LABELS, MASK, strict=True):
        if not m:
            continue
        ces.append(-math.log(softmax(s)[y]))
        ps, qs = softmax(s, t), softmax(q, t)
        term = kl(qs, ps) if direction == "forward" else kl(ps, qs)
        kls.append(term if theta is None or max(qs) > theta else 0.0)
    ce, kd = sum(ces) / len(ces), sum(kls) / len(ces)
    return alpha * ce + (1 - alpha) * t * t * kd, ce, kd


def run(teacher: torch.Tensor | TeacherTopK, **kw: object) -> dict[str, torch.Tensor]:
    return token_kd_loss(
        torch.tensor(STUDENT),
        torch.tensor(LABELS),
        torch.tensor(MASK),
        teacher,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("theta", [None, 0.5])
def test_online_matches_hand_computation(direction: str, theta: float | None) -> None:
    out = run(torch.tensor(TEACHER), alpha=0.3, temperature=2.0, direction=direction, theta=theta)
    loss, ce, kd = hand(0.3, 2.0, theta, direction)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["kl"].item() == pytest.approx(kd, rel=1e-5, abs=1e-8)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-6)


def test_confidence_mask_selects_confident_positions_only() -> None:
    # at T=2 the teacher's max probabilities are ~0.68 (position 0) and ~0.36 (position 1)
    conf = [max(softmax(q, 2.0)) for q in TEACHER[:2]]
    assert conf[0] > 0.6 > 0.4 > conf[1]
    out = run(torch.tensor(TEACHER), temperature=2.0, theta=0.5)
    assert out["selected_N"].tolist() == [True, False, False]
    assert out["kl"].item() > 0
    # the paper's theta=0.7 selects nothing here: the loss is CE only, scaled by alpha
    strict = run(torch.tensor(TEACHER), alpha=0.5, temperature=2.0, theta=0.7)
    assert strict["kl"].item() == 0.0
    assert strict["loss"].item() == pytest.approx(0.5 * hand(0.5, 2.0, None)[1], rel=1e-6)


def test_theta_zero_is_plain_token_kd() -> None:
    plain = run(torch.tensor(TEACHER), temperature=2.0)
    masked = run(torch.tensor(TEACHER), temperature=2.0, theta=0.0)
    assert masked["loss"].item() == plain["loss"].item()
    assert masked["selected_N"].tolist() == MASK


def test_top_k_equals_online_when_k_is_the_vocabulary() -> None:
    logp = torch.log_softmax(torch.tensor(TEACHER), dim=-1)
    order = torch.argsort(logp, dim=-1, descending=True)
    topk = TeacherTopK(ids_NK=order, logp_NK=logp.gather(1, order))
    for direction in ("forward", "reverse"):
        online = run(torch.tensor(TEACHER), temperature=2.0, direction=direction, theta=0.5)
        offline = run(topk, temperature=2.0, direction=direction, theta=0.5)
        assert offline["loss"].item() == pytest.approx(online["loss"].item(), rel=1e-6)


def test_top_k_truncated_support_by_hand() -> None:
    # keep the teacher's two best tokens: q renormalised over them, student's full log-probs there
    logp = torch.log_softmax(torch.tensor(TEACHER), dim=-1)
    top = torch.topk(logp, 2, dim=-1)
    out = run(TeacherTopK(ids_NK=top.indices, logp_NK=top.values), alpha=0.0, temperature=1.0)
    terms = []
    for s, q in zip(STUDENT[:2], TEACHER[:2], strict=True):
        ids = sorted(range(3), key=lambda i: -q[i])[:2]
        qk = softmax([q[i] for i in ids])
        ps = softmax(s)
        terms.append(sum(a * (math.log(a) - math.log(ps[i])) for a, i in zip(qk, ids, strict=True)))
    assert out["loss"].item() == pytest.approx(sum(terms) / 2, rel=1e-6)


def test_gradients_reach_the_student_only() -> None:
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    token_kd_loss(student, torch.tensor(LABELS), torch.tensor(MASK), teacher)["loss"].backward()
    assert student.grad is not None and student.grad[:2].abs().sum() > 0
    assert student.grad[2].abs().sum() == 0  # masked position
    assert teacher.grad is None


def test_bad_input() -> None:
    with pytest.raises(MoEAdaptError, match="same tokenizer"):
        run(torch.zeros(3, 5))
    with pytest.raises(MoEAdaptError, match="vocabulary has 3"):
        run(TeacherTopK(ids_NK=torch.full((3, 2), 7), logp_NK=torch.zeros(3, 2)))
    with pytest.raises(MoEAdaptError, match="direction"):
        run(torch.tensor(TEACHER), direction="sideways")
    with pytest.raises(MoEAdaptError, match="alpha"):
        run(torch.tensor(TEACHER), alpha=1.5)
