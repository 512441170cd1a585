"""The dense network's trace is reused within a process only for the very same network
(export/dense.py: :func:`dense_fingerprint`); the service tests' versions of the demo model (three exports of
one checkpoint) are the reuse at work, each export still measuring its own parity."""

from __future__ import annotations

import pytest
from support.models import biased_retinanet

pytestmark = pytest.mark.export


def test_the_fingerprint_changes_with_anything_the_trace_depends_on() -> None:
    import torch
    from retinaedge.export.dense import dense_fingerprint, make_dense_module

    model = biased_retinanet("mobilenet_v3_fpn64", 3, seed=1)
    dense = make_dense_module(model, 1)
    base = dense_fingerprint(dense, 1, 256, 256)
    assert dense_fingerprint(make_dense_module(model, 1), 1, 256, 256) == base  # same network, same key
    assert dense_fingerprint(dense, 1, 224, 256) != base  # another input size
    assert dense_fingerprint(make_dense_module(model, 3), 3, 256, 256) != base  # another channel count
    other = biased_retinanet("mobilenet_v3_fpn64", 3, seed=1)
    with torch.no_grad():
        other.head.regression_head.bbox_reg.bias[0] += 1e-6  # one weight, barely
    assert dense_fingerprint(make_dense_module(other, 1), 1, 256, 256) != base
    eps = biased_retinanet("mobilenet_v3_fpn64", 3, seed=1)
    norm = next(m for m in eps.modules() if hasattr(m, "eps"))
    norm.eps *= 10  # a plain attribute, no weight changed
    assert dense_fingerprint(make_dense_module(eps, 1), 1, 256, 256) != base
