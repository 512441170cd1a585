"""``backend = triton``: batches go to a Triton Inference Server that serves this very bundle.

The appliance keeps DICOM in, windowing, letterbox, results, SR and durability; Triton runs the model
(a repository written by ``retinaedge export-triton``). ``infer(images)`` splits the batch into chunks of
Triton's ``max_batch_size`` and sends each with tritonclient's asyncio client (HTTP, ``tritonclient.http.
aio``, or gRPC, ``tritonclient.grpc.aio``) on an event loop in a thread this backend owns; the caller
blocks on :func:`asyncio.run_coroutine_threadsafe` (the synchronous HTTP client is gevent-based and not
thread-safe).

At open it waits (``start_timeout_s``; the worker's status says why) until Triton and the model are
ready, then reads the model configuration and refuses a model exported from another bundle: its
:data:`SHA_PARAMETER` must equal the bundle's model sha256 (both are named). The worker then runs the
golden self-test through Triton. While serving, a probe on the loop (every ``probe_interval_s``) checks
readiness and the sha256 again; when Triton is unreachable (or serves something else), :meth:`unavailable`
says why (``/readyz`` answers 503) and ``infer`` raises :class:`NotReadyError`, so STOW-RS instances stay
pending and the processor retries them once the probe finds Triton back. With ``unreachable=onnxruntime``
the bundle's model runs on local ONNX Runtime instead while Triton is away.

Options (``BackendOptions.extra``, from the service's ``triton_*`` settings): ``url`` (``host:port``),
``model`` (default: the manifest's name), ``protocol`` (``http``/``grpc``), ``timeout_s`` (one batch),
``connect_timeout_s`` (a health or configuration call), ``start_timeout_s``, ``probe_interval_s``,
``unreachable`` (``not_ready``/``onnxruntime``), ``on_status`` (callable for progress while opening).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.detections import OUTPUT_NAMES
from retinaedge.runtime.errors import ConfigError, MissingDependencyError, NotReadyError, RetinaEdgeError
from retinaedge.runtime.threadname import name_this_thread

if TYPE_CHECKING:
    from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: Model configuration ``parameters`` written by ``export-triton`` (:mod:`retinaedge.export.triton.config`).
SHA_PARAMETER = "retinaedge_model_sha256"
MANIFEST_PARAMETER = "retinaedge_manifest"
#: tensorrt repositories: the golden self-test criteria the engines were accepted with (JSON), when
#: looser than the bundle's (FP16/INT8 engines).
CRITERIA_PARAMETER = "retinaedge_self_test_criteria"
PROTOCOLS = ("http", "grpc")
UNREACHABLE = ("not_ready", "onnxruntime")
#: gRPC's 4 MiB default message limit is far below a batch of images.
_GRPC_CHANNEL = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class TritonInferError(RetinaEdgeError):
    """Triton was ready but failed the batch itself (a model error, not an outage)."""

    type = "inference-failed"
    http_status = 500


class _Unreachable(Exception):
    """Triton or the model is not ready, or cannot be reached; the message says which."""


@dataclass(frozen=True)
class TritonOptions:
    """How to reach Triton (see the module docstring); times in seconds."""

    url: str = "127.0.0.1:8000"
    model: str | None = None
    protocol: str = "http"
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    start_timeout_s: float = 120.0
    probe_interval_s: float = 2.0
    unreachable: str = "not_ready"

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> TritonOptions:
        """From ``extra`` (the service's ``triton_*`` settings); a field it lacks comes from the variable
        ``RETINAEDGE_TRITON_<FIELD>`` (CLI verbs' ``--backend triton``), else its default."""
        known: dict[str, Any] = {}
        for name, spec in cls.__dataclass_fields__.items():
            value = extra.get(name)
            if value is None and (text := os.environ.get(f"RETINAEDGE_TRITON_{name.upper()}")):
                try:
                    value = float(text) if isinstance(spec.default, float) else text
                except ValueError:
                    raise ConfigError(
                        f"RETINAEDGE_TRITON_{name.upper()} must be a number, got {text!r}"
                    ) from None
            if value is not None:
                known[name] = value
        opts = cls(**known)
        if opts.protocol not in PROTOCOLS:
            raise ConfigError(f"triton_protocol must be one of {PROTOCOLS}, got {opts.protocol!r}")
        if opts.unreachable not in UNREACHABLE:
            raise ConfigError(f"triton_unreachable must be one of {UNREACHABLE}, got {opts.unreachable!r}")
        if "://" in opts.url:
            raise ConfigError(f"triton_url is host:port without a scheme, got {opts.url!r}")
        return opts


def check() -> None:
    """Raise :class:`MissingDependencyError` when tritonclient is not installed (finds, does not import)."""
    if importlib.util.find_spec("tritonclient") is None:
        raise MissingDependencyError("tritonclient", "triton", "backend=triton")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


#: gRPC status codes of a connection problem, not of the request.
_GRPC_TRANSPORT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


def _transport_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the request did not get through (rather than Triton refusing it)."""
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return True
    if type(exc).__module__.startswith("aiohttp") and "Connection" in "".join(
        c.__name__ for c in type(exc).__mro__
    ):
        return True
    status = getattr(exc, "status", None)
    code = status() if callable(status) else status
    return isinstance(code, str) and any(code.endswith(c) for c in _GRPC_TRANSPORT)


class _Client:
    """tritonclient's asyncio client for one protocol; create and use on the backend's loop only."""

    def __init__(self, opts: TritonOptions, model: str) -> None:
        self.opts, self.model = opts, model
        if opts.protocol == "http":
            import tritonclient.http as api
            import tritonclient.http.aio as aio

            self.client: Any = aio.InferenceServerClient(opts.url, conn_timeout=opts.timeout_s)
        else:
            import tritonclient.grpc as api
            import tritonclient.grpc.aio as aio

            self.client = aio.InferenceServerClient(opts.url, channel_args=_GRPC_CHANNEL)
        self.api = api

    def _kw(self, timeout: float) -> dict[str, Any]:
        return {"client_timeout": timeout} if self.opts.protocol == "grpc" else {}

    async def config(self) -> dict[str, Any]:
        """The model's configuration as JSON (raises :class:`_Unreachable` when not ready)."""
        t = self.opts.connect_timeout_s
        try:
            server = await asyncio.wait_for(self.client.is_server_ready(**self._kw(t)), t)
            if not server:
                raise _Unreachable(f"Triton at {self.opts.url} is not ready")
            ready = await asyncio.wait_for(self.client.is_model_ready(self.model, **self._kw(t)), t)
            if not ready:
                raise _Unreachable(f"Triton at {self.opts.url} has no ready model {self.model!r}")
            if self.opts.protocol == "grpc":
                doc = await asyncio.wait_for(
                    self.client.get_model_config(self.model, as_json=True, **self._kw(t)), t
                )
                return dict(doc["config"])
            return dict(await asyncio.wait_for(self.client.get_model_config(self.model), t))
        except _Unreachable:
            raise
        except Exception as exc:  # connection refused, reset, timeout, UNAVAILABLE: all mean not reachable
            raise _Unreachable(f"Triton at {self.opts.url} is unreachable ({_describe(exc)})") from exc

    async def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        inp = self.api.InferInput("images", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        outputs = [self.api.InferRequestedOutput(name) for name in OUTPUT_NAMES]
        t = self.opts.timeout_s
        result = await asyncio.wait_for(
            self.client.infer(self.model, [inp], outputs=outputs, **self._kw(t)), t
        )
        return {name: result.as_numpy(name) for name in OUTPUT_NAMES}

    async def close(self) -> None:
        await self.client.close()


class TritonBackend(Backend):
    """``infer(images (N, C, H, W) float32) -> contract outputs``, computed by Triton (module docstring)."""

    name = "triton"

    def __init__(self, bundle: Bundle, opts: TritonOptions, local: Backend | None = None) -> None:
        self.bundle, self.opts, self.local = bundle, opts, local
        self.model = opts.model or bundle.manifest.name
        self.expected_sha = str(bundle.manifest.model_sha256)
        self.max_batch = 0
        self.served_sha: str | None = None
        self._down: str | None = "not connected yet"
        self.providers = (f"triton {opts.protocol}://{opts.url}/{self.model}",)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="retinaedge-triton", daemon=True)
        self._thread.start()
        self._client: _Client = self._call(self._make_client(), opts.connect_timeout_s)
        self._probe: concurrent.futures.Future[None] | None = None

    async def _make_client(self) -> _Client:
        return _Client(self.opts, self.model)

    def _run_loop(self) -> None:
        name_this_thread()
        self._loop.run_forever()

    def _call(self, coro: Any, timeout: float) -> Any:
        """Run ``coro`` on the backend's loop and wait at most ``timeout`` s (+1 s for the hand-over)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from Triton at {self.opts.url} within {timeout:.0f} s") from None

    # -- start ------------------------------------------------------------------------------------
    def connect(self, on_status: Callable[[str], None]) -> None:
        """Wait for Triton and the model, verify what it serves, start the probe (see module docstring)."""
        deadline = time.monotonic() + self.opts.start_timeout_s
        while True:
            try:
                config = self._call(self._client.config(), self.opts.connect_timeout_s)
                break
            except (_Unreachable, TimeoutError) as exc:
                why = str(exc)
                if self.local is not None:
                    self._mark_down(f"{why}; serving with local ONNX Runtime until it is back")
                    self.reason = (
                        f"Triton at {self.opts.url} not reachable at start: local ONNX Runtime serves"
                    )
                    self._start_probe()
                    return
                if time.monotonic() >= deadline:
                    raise NotReadyError(
                        f"{why} (waited {self.opts.start_timeout_s:.0f} s at start)"
                    ) from None
                on_status(f"waiting for Triton: {why}")
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        problem = self._verify(config)
        if problem is not None:
            raise ConfigError(problem)
        self._mark_up()
        self.reason = (
            f"Triton at {self.opts.url} ({self.opts.protocol}) serves model {self.model!r}, "
            f"model sha256 {self.expected_sha[:12]}... verified, max_batch_size {self.max_batch}"
        )
        self._start_probe()

    def _verify(self, config: Mapping[str, Any]) -> str | None:
        """Why the served model is not this bundle's (None when it is); sets ``max_batch``."""
        params = config.get("parameters") or {}
        served = (params.get(SHA_PARAMETER) or {}).get("string_value")
        self.served_sha = served
        name = self.bundle.manifest.name
        if not served:
            return (
                f"Triton model {self.model!r} at {self.opts.url} has no {SHA_PARAMETER} parameter: it was not "
                f"written by retinaedge export-triton; refusing it for bundle {name} (model sha256 "
                f"{self.expected_sha})"
            )
        if served != self.expected_sha:
            return (
                f"Triton model {self.model!r} at {self.opts.url} was exported from another bundle: it serves "
                f"model sha256 {served}, this appliance's bundle {name} has model sha256 {self.expected_sha}; "
                f"export the repository from this bundle (retinaedge export-triton --model ...)"
            )
        criteria = (params.get(CRITERIA_PARAMETER) or {}).get("string_value")
        if criteria:
            try:
                self.self_test_criteria = {k: float(v) for k, v in json.loads(criteria).items()}
            except (ValueError, TypeError, AttributeError):
                return f"Triton model {self.model!r}: parameter {CRITERIA_PARAMETER} is not a JSON object of numbers"
        max_batch = int(config.get("max_batch_size") or 0)
        if max_batch < 1:
            return f"Triton model {self.model!r} has max_batch_size {max_batch}; export-triton writes >= 1"
        self.max_batch = max_batch
        return None

    # -- health -----------------------------------------------------------------------------------
    def _mark_down(self, why: str) -> None:
        if self._down != why:
            log.warning("backend triton not available: %s", why)
        self._down = why

    def _mark_up(self) -> None:
        if self._down is not None and self.served_sha is not None:
            log.info("backend triton: Triton at %s serves model %r again", self.opts.url, self.model)
        self._down = None

    def _start_probe(self) -> None:
        self._probe = asyncio.run_coroutine_threadsafe(self._probe_loop(), self._loop)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opts.probe_interval_s)
            try:
                config = await self._client.config()
            except _Unreachable as exc:
                self._mark_down(str(exc))
                continue
            problem = self._verify(config)
            if problem is None:
                self._mark_up()
            else:
                self._mark_down(problem)

    def unavailable(self) -> str | None:
        """Why batches cannot run now (None while Triton serves, or while local ONNX Runtime stands in)."""
        return None if self.local is not None else self._down

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.opts.url,
            "protocol": self.opts.protocol,
            "model": self.model,
            "max_batch_size": self.max_batch,
            "served_model_sha256": self.served_sha,
            "available": self._down is None,
            "problem": self._down,
            "local_fallback": "onnxruntime" if self.local is not None else None,
        }

    # -- inference --------------------------------------------------------------------------------
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch ``(N, C, H, W)`` float32 through Triton, ``max_batch_size`` frames per request."""
        if images.dtype != np.float32 or images.ndim != 4:
            raise ConfigError(f"images must be float32 (N, C, H, W), got {images.dtype} {images.shape}")
        step = self.max_batch or images.shape[0]
        parts = [
            self._infer_chunk(np.ascontiguousarray(images[i : i + step])) for i in range(0, len(images), step)
        ]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_NAMES}

    def _infer_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        down = self._down
        if down is None:
            try:
                out = self._call(self._client.infer(chunk), self.opts.timeout_s)
            except Exception as exc:
                down = self._diagnose(exc)
            else:
                out["num_detections"] = out["num_detections"].reshape(-1)  # Triton's dims [1] -> (N,)
                return out
        if self.local is not None:
            return self.local.infer(chunk)
        raise NotReadyError(f"the model is not ready: {down}")

    def _diagnose(self, exc: Exception) -> str:
        """After a failed batch: outage (returned, marked down) or Triton's own failure of it (raised).

        A transport failure (refused, reset, timed out, gRPC UNAVAILABLE) is an outage even if Triton
        answers again by now (the probe clears it); otherwise Triton's health decides."""
        if _transport_failure(exc):
            why = f"Triton at {self.opts.url} is unreachable ({_describe(exc)})"
            self._mark_down(why)
            return why
        try:
            self._call(self._client.config(), self.opts.connect_timeout_s)
        except (_Unreachable, TimeoutError) as health:
            self._mark_down(str(health))
            return str(health)
        raise TritonInferError(f"Triton at {self.opts.url} failed the batch: {_describe(exc)}") from exc

    def close(self) -> None:
        if not self._loop.is_closed():
            if self._probe is not None:
                self._probe.cancel()
            try:
                self._call(self._client.close(), self.opts.connect_timeout_s)
            except Exception as exc:  # closing a client whose server is gone: nothing left to release
                log.debug("closing the Triton client: %s", _describe(exc))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
        if self.local is not None:
            self.local.close()


def open(bundle: Bundle, options: BackendOptions) -> TritonBackend:  # noqa: A001 (registry factory)
    """The registry factory: connect to Triton per ``options.extra`` (module docstring), verified."""
    check()
    opts = TritonOptions.from_extra(options.extra)
    local = None
    if opts.unreachable == "onnxruntime":
        from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend

        local = OnnxRuntimeBackend(bundle.model_path, threads=options.threads)
    backend = TritonBackend(bundle, opts, local)
    try:
        backend.connect(options.extra.get("on_status") or (lambda _s: None))
    except BaseException:
        backend.close()
        raise
    return backend
