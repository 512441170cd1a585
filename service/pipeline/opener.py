"""Opens the detector the settings ask for, on the inference thread, and runs a deferred engine build.

:class:`DetectorOpener` is what the :class:`~retinaedge.service.pipeline.stages.InferenceWorker` calls to load the
model. It asks :func:`~retinaedge.runtime.backends.auto.choose_backend` for the backend (ONNX Runtime is opened
through the backend registry, :func:`retinaedge.runtime.backends.open_backend`); with
``engine_build_while=onnxruntime`` a needed engine build is deferred: ONNX Runtime serves at once, a
:class:`~retinaedge.runtime.backends.tensorrt.background.BackgroundBuild` runs ``retinaedge build`` in a child process,
and on its success the worker swaps to the engine (loaded from the cache and self-tested on the inference
thread). With ``not_ready`` (the default) the build runs inside the load and ``/readyz`` says so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.backends import Backend, BackendOptions, open_backend
from retinaedge.runtime.backends.auto import choose_backend
from retinaedge.runtime.backends.policy import BACKEND_MODES
from retinaedge.runtime.backends.tensorrt.background import BackgroundBuild, build_argv, failure_summary
from retinaedge.runtime.backends.tensorrt.planning import BackendPlan, Probe, plan_backend
from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.dicomio import Limits
from retinaedge.service.pipeline.stages import InferenceWorker

if TYPE_CHECKING:
    from retinaedge.service.settings import Settings

log = logging.getLogger(__name__)


class DetectorOpener:
    """``opener() -> Detector`` for the worker; ``attach(worker)`` before the worker starts."""

    def __init__(self, settings: Settings, bundle: Bundle, limits: Limits, probe: Probe) -> None:
        self.settings = settings
        self.bundle = bundle
        self.limits = limits
        self.probe = probe
        self.worker: InferenceWorker | None = None
        self.build: BackgroundBuild | None = None
        self.plan: BackendPlan | None = None
        self.backend: Backend | None = None  # the last one opened (what /readyz asks about)

    def attach(self, worker: InferenceWorker) -> None:
        self.worker = worker

    def __call__(self) -> Detector:
        return self.open(
            allow_build=self.settings.engine_build,
            defer_build=self.settings.engine_build_while == "onnxruntime",
        )

    def open(self, *, allow_build: bool, defer_build: bool) -> Detector:
        """Choose and open the backend (runs on the inference thread: it owns the CUDA context)."""
        s = self.settings
        if s.backend not in BACKEND_MODES:
            return self._open_registered(s.backend)
        plan = plan_backend(
            self.bundle,
            mode=s.backend,
            options=s.build_options(),
            cache_root=s.engine_cache_root,
            cache_max_bytes=s.engine_cache_max_bytes,
            allow_build=allow_build,
            probe=self.probe,
            retry_after_s=s.engine_build_retry_s,
        )
        choice = choose_backend(
            self.bundle,
            plan,
            mode=s.backend,
            open_onnxruntime=lambda: open_backend(
                "onnxruntime", self.bundle, BackendOptions(threads=s.threads)
            ),
            on_status=self.worker.set_status if self.worker is not None else lambda _s: None,
            defer_build=defer_build,
        )
        self.plan = choice.plan
        self.backend = choice.backend
        log.info("backend %s: %s", choice.backend.name, choice.reason)
        detector = Detector(
            self.bundle,
            choice.backend,
            batch_size=s.max_batch_size,
            limits=self.limits,
            backend_reason=choice.reason,
            self_test_criteria=choice.criteria,
        )
        if choice.deferred and choice.plan is not None and self.build is None:
            self.build = BackgroundBuild(
                build_argv(self.bundle.root or self.bundle.model_path.parent, s),
                lambda ok, tail: self._build_done(choice.plan, ok, tail),
            )
            self.build.start()
        return detector

    def _open_registered(self, name: str) -> Detector:
        """A registry backend outside the TensorRT policy (e.g. ``triton``), with its ``NAME_*`` settings."""
        s = self.settings
        on_status = self.worker.set_status if self.worker is not None else lambda _s: None
        extra = {**s.backend_extra(name), "on_status": on_status}
        backend = open_backend(
            name,
            self.bundle,
            BackendOptions(
                threads=s.threads, batch_size=s.max_batch_size, cache_dir=s.data_dir / name, extra=extra
            ),
        )
        self.backend = backend
        return Detector(
            self.bundle,
            backend,
            batch_size=s.max_batch_size,
            limits=self.limits,
            backend_reason=backend.reason,
            self_test_criteria=backend.self_test_criteria,
        )

    def unavailable(self) -> str | None:
        """Why the backend in use cannot run batches now (a remote server down), or None."""
        return self.backend.unavailable() if self.backend is not None else None

    def _open_built(self) -> Detector:
        """The engine the child built, from the cache; anything else is refused (ONNX Runtime stays)."""
        detector = self.open(allow_build=False, defer_build=False)
        if detector.backend.name != "tensorrt":
            reason = detector.backend_reason
            detector.close()
            raise RuntimeError(f"the engine built in the background is not usable: {reason}")
        return detector

    def _build_done(self, plan: BackendPlan | None, ok: bool, log_tail: str) -> None:
        worker = self.worker
        if worker is None:
            return
        worker.wait_ready()
        if ok:
            swapped = worker.swap(self._open_built).result()
            log.info("switch to the engine built in the background: %s", "done" if swapped else "refused")
            return
        why = failure_summary(log_tail, self.build.returncode if self.build is not None else None)
        if plan is not None and plan.cache is not None and plan.lookup is not None:
            plan.cache.record_failure(plan.lookup.key, why)
        worker.report_backend(
            f"TensorRT not used: the engine build in the background failed ({why}); serving with ONNX Runtime"
        )

    @property
    def build_status(self) -> str | None:
        """``running``, ``succeeded``, ``failed``, ``stopped``, or None when nothing was built in the
        background."""
        return self.build.status if self.build is not None else None

    def stop(self) -> None:
        """Terminate a running background build (service shutdown)."""
        if self.build is not None:
            self.build.stop()

    def describe(self) -> dict[str, Any]:
        """The start-up decision for /readyz and /v1/model."""
        described = {
            "decision": self.plan.decision if self.plan is not None else None,
            "background_build": self.build_status,
        }
        if self.backend is None or not (facts := self.backend.describe()):
            return described
        # A remote server's address and state (triton); a local backend's facts under its name (openvino:
        # precision, gate figures, compiled-model settings).
        return {**described, ("remote" if self.backend.name == "triton" else self.backend.name): facts}
