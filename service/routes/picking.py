"""Which model's result a request reads: ``?model=NAME``, or the one model that has a result.

An appliance with one model answers as it always did. With several, a result (instance, series, study)
is per model: ``?model=NAME`` names it (404 ``unknown-model`` for a model not served); without it the
route reads the only model whose rows of the subject are not all ``not-applicable``, and when several
models have results it answers 400 naming them (a JSON route of an instance lists them instead:
:mod:`.results`).
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import Query
from retinaedge.runtime.errors import RequestError
from retinaedge.service.lanes import Lane
from retinaedge.service.results.rows import Row, state_of
from retinaedge.service.state import Services

MODEL_QUERY = Query(
    default=None,
    min_length=1,
    max_length=64,
    description="the model whose result to read (GET /v1/models lists them); needed only when several "
    "models have results of the subject",
)


def applicable_models(rows: Iterable[Row]) -> list[str]:
    """The models of ``rows`` whose rows are not all ``not-applicable``, in order of first appearance."""
    seen: dict[str, bool] = {}
    for row in rows:
        seen[row.model] = seen.get(row.model, False) or state_of(row) != "not_applicable"
    return [m for m, used in seen.items() if used]


def pick(services: Services, model: str | None, rows: list[Row]) -> Lane | None:
    """The lane to read ``rows`` (every model's rows of one subject) with: the named one, the only one
    served, or the only one with results; None when several have results (the caller decides); a lane
    of the rows when every row is ``not-applicable``."""
    if model is not None:
        return services.lane(model)
    if len(services.lanes) == 1:
        return services.first
    used = [m for m in applicable_models(rows) if m in services.lanes]
    if len(used) == 1:
        return services.lanes[used[0]]
    if not used:
        served = [r.model for r in rows if r.model in services.lanes]
        return services.lanes[served[0]] if served else services.first
    return None


def pick_one(services: Services, model: str | None, rows: list[Row], what: str) -> Lane:
    """:func:`pick`, with 400 when several models have results of ``what``."""
    lane = pick(services, model, rows)
    if lane is None:
        used = ", ".join(m for m in applicable_models(rows) if m in services.lanes)
        raise RequestError(f"{what} has results of several models ({used}): name one with ?model=NAME")
    return lane
