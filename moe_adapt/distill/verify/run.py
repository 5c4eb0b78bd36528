"""Running the checks: on one trace (:func:`check_trace`) or on a stream of traces (:func:`verify_traces`)."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm

from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify.base import Check, Rejection, Trace
from moe_adapt.distill.verify.config import VerifyConfig, build_checks
from moe_adapt.distill.verify.parse import parse_response
from moe_adapt.distill.verify.report import VerifyResult
from moe_adapt.errors import MoEAdaptError


def check_trace(trace: Trace, checks: list[Check], fmt: ResponseFormat) -> list[Rejection]:
    """Every rejection of ``trace`` by ``checks`` (empty when it passes them all)."""
    parsed = parse_response(trace.response, fmt)
    return [r for check in checks if (r := check(trace, parsed)) is not None]


def verify_traces(
    traces: Iterable[Trace],
    cfg: VerifyConfig,
    fmt: ResponseFormat | None = None,
    *,
    progress: bool = False,
) -> VerifyResult:
    """Run the checks of ``cfg`` on every trace; keep those that pass all of them.

    ``fmt`` defaults to :class:`ResponseFormat`'s ``<think>``/``</think>``. Trace ids must be
    unique (:class:`MoEAdaptError` otherwise).
    """
    fmt = fmt or ResponseFormat()
    checks = build_checks(cfg, fmt)
    result = VerifyResult(checks=[c.name for c in checks])
    ids: set[str] = set()
    for trace in tqdm(traces, desc="verify", unit="trace", disable=not progress):
        if trace.id in ids:
            raise MoEAdaptError(f"trace id {trace.id!r} appears twice; trace ids must be unique")
        ids.add(trace.id)
        rejections = check_trace(trace, checks, fmt)
        if rejections:
            result.rejected.append((trace, rejections))
        else:
            result.kept.append(trace)
    return result
