"""Retention of the kept results: :class:`Pruner`, run after results are recorded, at most once per
``prune_interval_s``; it drops rows beyond ``results_max_age_s`` or ``results_max_bytes`` and the files
kept for them (identity files once no model keeps a result of the instance, captures, built documents).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from retinaedge.service.results.built import BuiltDocuments
from retinaedge.service.results.captures import CaptureFiles
from retinaedge.service.results.evidence import IdentityFiles
from retinaedge.service.results.rows import subject_key
from retinaedge.service.results.store import Store


@dataclass
class Pruner:
    """Retention, at most once per ``interval_s``: a pass reads every kept result's size, too much work
    for every request."""

    store: Store
    identities: IdentityFiles
    interval_s: float
    max_age_s: float
    max_bytes: int
    captures: CaptureFiles | None = None  # removed with their results
    captures_max_bytes: int | None = None  # and the oldest beyond this budget
    built: BuiltDocuments | None = None  # removed with their results
    last: float = -math.inf  # time.monotonic() of the last pass

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        self.last = now
        with self.identities.lock:  # no identity is written and its row inserted meanwhile
            gone = self.store.prune(self.max_age_s, self.max_bytes)
            uids = {uid for uid, _model in gone}
            self.identities.delete(uids - self.store.known(uids))  # once no model keeps a result of it
            keys = [subject_key(model, uid) for uid, model in gone]
            if self.captures is not None:
                self.captures.delete(keys)
            if self.built is not None and gone:
                self.built.delete(keys)
                self.built.keep_only(self.store.subjects())  # and the series' and studies' left empty
        if self.captures is not None and self.captures_max_bytes is not None:
            self.captures.trim(self.captures_max_bytes)
