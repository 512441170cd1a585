"""Service settings: environment variables (``RETINAEDGE_*``) and an optional JSON config file.

Precedence: explicit arguments > environment > config file (``RETINAEDGE_CONFIG_FILE``) > defaults.
The API token may also come from a file (``RETINAEDGE_API_TOKEN_FILE``, e.g. a Docker secret); the
variable ``RETINAEDGE_API_TOKEN`` wins over it.
Settings are built once and passed to :func:`retinaedge.service.app.create_app`; nothing is read at import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from retinaedge.runtime.backends.tensorrt.settings import EngineConfig
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.findings import LinkParams, default_min_score
from retinaedge.runtime.settings_source import (
    build_settings,
    environment_names,
    file_values_below_environment,
)
from retinaedge.runtime.signing import TrustedKey
from retinaedge.service.http.addresses import is_loopback
from retinaedge.service.outbox.destinations import DeliveryDestination, check_unique


class ModelEntry(BaseModel):
    """One bundle of the ``models`` setting: its directory and the extra DICOM AE titles bound to it (a
    C-STORE to one of them is run by this model only; docs/integration.md, "Several models"). A plain
    string is the directory alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    ae_titles: list[str] = Field(default_factory=list)
    backend: str | None = Field(
        default=None, description="this model's backend (default: the backend setting), e.g. openvino"
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from retinaedge.runtime.backends.registry import choices

        if v not in choices():
            raise ValueError(f"backend should be one of {', '.join(repr(k) for k in choices())}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _plain_path(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, (str, Path)) else data


class Settings(EngineConfig):
    """Everything the service needs; sizes in bytes, times in seconds.

    The engine settings (``max_batch_size``, ``data_dir``, ``engine_*``) are the TensorRT backend's
    :class:`~retinaedge.runtime.backends.tensorrt.settings.EngineConfig`, extended here.
    """

    model_config = SettingsConfigDict(env_prefix="RETINAEDGE_", extra="forbid", frozen=True)

    model: Path | None = Field(
        default=None, description="model bundle directory (the one-bundle form of models)"
    )
    models: list[ModelEntry] = Field(
        default_factory=list,
        description="model bundles, each run on the images its intended use accepts: directories, or "
        '{"path": DIR, "ae_titles": ["AET"]} to bind DICOM AE titles to it (JSON list)',
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    api_token: SecretStr | None = Field(default=None, description="bearer token; required beyond loopback")
    trusted_keys: str | None = Field(
        default=None,
        description="Ed25519 public keys (PEM) a model bundle must be signed by: a directory of *.pem files "
        "or key files, separated by ':' or as a JSON list; none: signatures are not checked",
    )
    max_body_bytes: int = Field(default=512 * 1024**2, ge=1024)
    max_frames: int = Field(default=2000, ge=1)
    max_frame_bytes: int = Field(default=256 * 1024**2, ge=1024)
    max_decoded_bytes: int = Field(default=4 * 1024**3, ge=1024)
    queue_size: int = Field(
        default=8,
        ge=1,
        description="instances admitted to the pipeline besides the one at its head (being read, waiting "
        "for or in inference); beyond, /v1/detect answers 503 and STOW-RS processing waits",
    )
    queue_max_age_s: float = Field(default=60.0, gt=0, description="older queued work is refused with 503")
    retry_after_s: int = Field(default=5, ge=1)
    batch_delay_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="how long the first frame of a batch waits for more while other frames are being read",
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list,
        description="batch sizes run at once when reached with nothing else waiting (empty: only "
        "max_batch_size)",
    )
    prepare_threads: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="threads reading, decoding and windowing instances (default: the usable CPUs, at most 4)",
    )
    reader_processes: int = Field(
        default=0,
        ge=0,
        le=64,
        description="processes that read, decode and window instances beside the service's own (0: threads "
        "of the service's process). With an accelerator doing inference they take the readers' CPU out of the "
        "event loop's GIL (docs/operations.md); each costs a Python process's memory",
    )
    max_frames_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="prepared frames waiting for inference at most (default 4 x max_batch_size): bounds the "
        "memory of frames read ahead",
    )
    processing_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="STOW-RS instances processed at the same time (default max_batch_size), so that their "
        "frames can share batches",
    )
    min_free_bytes: int = Field(
        default=1024**3, ge=0, description="disk reserve; below it new instances get 507"
    )
    max_request_bytes: int = Field(default=4 * 1024**3, ge=1024, description="one STOW-RS request body")
    max_pending_instances: int = Field(
        default=5000, ge=1, description="STOW-RS answers 503 while this many instances wait to be processed"
    )
    max_pending_bytes: int = Field(
        default=4 * 1024**3,
        ge=1024,
        description="STOW-RS answers 503 while this many bytes wait to be processed",
    )
    request_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection whose request headers are not complete by then is closed",
    )
    request_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body that stops arriving for this long is answered 408"
    )
    results_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0, description="retention of results")
    results_max_bytes: int = Field(default=256 * 1024**2, ge=0, description="retention budget of result JSON")
    prune_interval_s: float = Field(
        default=10.0, ge=0, description="retention runs at most this often (after a result is kept)"
    )
    threads: int | None = Field(default=None, ge=1)
    series_quiet_s: float = Field(
        default=30.0, gt=0, description="a series is complete once no instance has arrived for this long"
    )
    series_min_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="findings scoring below are not linked (default: none beyond the model's operating "
        "point; 0.5 for a bundle without one)",
    )
    series_min_slices: int = Field(default=2, ge=1, description="findings on fewer slices are dropped")
    series_link_iou: float = Field(default=0.2, gt=0, le=1, description="IoU linking neighbouring slices")
    series_max_gap: int = Field(default=1, ge=0, description="slices a finding may skip")
    backend: str = Field(
        default="auto",
        description="auto: a valid cached TensorRT engine, else build one (engine_build), else ONNX Runtime; "
        "or any backend of the registry (onnxruntime, tensorrt, triton: a Triton Inference Server, "
        "triton_* settings; openvino: OpenVINO on the CPU, openvino_* settings)",
    )
    # backend=triton (docs/triton.md); a backend's settings are those prefixed with its name.
    triton_url: str = Field(default="127.0.0.1:8000", description="Triton host:port (HTTP 8000, gRPC 8001)")
    triton_model: str | None = Field(default=None, description="Triton model name (default: the manifest's)")
    triton_protocol: Literal["http", "grpc"] = "http"
    triton_timeout_s: float = Field(default=60.0, gt=0, description="one batch sent to Triton")
    triton_connect_timeout_s: float = Field(default=5.0, gt=0, description="a health or configuration call")
    triton_start_timeout_s: float = Field(
        default=120.0, ge=0, description="how long start-up waits for Triton and the model to be ready"
    )
    triton_probe_interval_s: float = Field(default=2.0, gt=0, description="Triton health probe while serving")
    triton_unreachable: Literal["not_ready", "onnxruntime"] = Field(
        default="not_ready",
        description="while Triton is unreachable: not ready (instances stay pending), or local ONNX Runtime",
    )
    # backend=openvino (docs/openvino.md): OpenVINO on the CPU, reduced precision behind a gate.
    openvino_precision: Literal["fp32", "bf16", "int8", "auto"] = Field(
        default="fp32",
        description="fp32, or bf16/int8/auto: served only after a gate on this CPU against the bundle's FP32 "
        "outputs (a failed gate serves fp32; the reason is in /readyz); auto: the fastest that passed",
    )
    openvino_cache_dir: Path | None = Field(
        default=None, description="compiled-model cache (default: data_dir/openvino)"
    )
    openvino_performance_hint: Literal["latency", "throughput"] = Field(
        default="latency",
        description="latency: one stream, all threads on a batch; throughput: a batch "
        "split over several streams",
    )
    openvino_int8_model: Literal["auto", "nncf", "qdq"] = Field(
        default="auto", description="the INT8 model: NNCF's (model.int8.openvino.xml) or the Q/DQ model"
    )
    openvino_gate_annotations: Path | None = Field(
        default=None, description="ground truth of openvino_gate_eval: the gate also checks the AP50 drop"
    )
    openvino_gate_eval: list[Path] = Field(
        default_factory=list, description="annotated DICOM files/dirs the precision gate also runs"
    )
    openvino_recheck_band: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="bf16/int8 are served with an FP32 re-run of each frame that has a detection within this "
        "score distance of its class's threshold (the gate checks them so); default per precision "
        "(bf16 0.05, int8 0.1), 0: none",
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate (chain): with tls_key_file, the service speaks HTTPS only"
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")
    captures: Literal["always", "never"] = Field(
        default="always",
        description="secondary captures (document sc) and overlay PNGs of the frames with findings: made "
        "when a result is recorded (always), or not at all (never: saves their CPU, about an inference's "
        "worth per frame with findings; no destination may then take sc)",
    )
    captures_max_bytes: int = Field(
        default=1024**3,
        ge=0,
        description="disk budget of the secondary captures kept; the oldest instances' beyond it are removed "
        "(their results stay)",
    )
    export_destinations: list[DeliveryDestination] = Field(
        default_factory=list,
        description="where results are pushed as DICOM SR (DIMSE C-STORE or STOW-RS; docs/integration.md)",
    )
    export_max_attempts: int = Field(default=20, ge=1, description="an SR is dead-lettered after this many")
    export_retry_initial_s: float = Field(default=10.0, gt=0, description="first retry delay, then doubled")
    export_retry_max_s: float = Field(default=3600.0, gt=0, description="the longest retry delay")
    dimse_port: int = Field(
        default=0, ge=0, le=65535, description="DICOM C-STORE SCP port on host (0: no DIMSE service)"
    )
    model_versions_kept: int = Field(
        default=3, ge=2, le=20, description="versions of each model kept (the active and earlier ones)"
    )
    max_bundle_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="a bundle archive staged by POST /v1/models/{name}/versions"
    )
    dimse_ae_title: str = Field(default="RETINAEDGE", description="the SCP's own AE title")
    dimse_ae_titles: dict[str, list[str]] = Field(
        default_factory=dict,
        description="more AE titles the SCP answers, each bound to the names of the models it runs "
        '(JSON object, e.g. {"BRAINAI": ["demo"]}); dimse_ae_title runs every model',
    )
    dimse_allowed_aets: list[str] = Field(
        default_factory=list,
        description='calling AEs accepted: "AET" or "AET@ip"; empty allows any (loopback only)',
    )
    dimse_max_associations: int = Field(default=8, ge=1, description="simultaneous associations")
    dimse_max_pdu_bytes: int = Field(
        default=131072,
        ge=4096,
        le=16 * 1024**2,
        description="largest P-DATA-TF PDU accepted (the Maximum Length advertised; bounds memory per association)",
    )
    dimse_acse_timeout_s: float = Field(default=30.0, gt=0, description="association negotiation")
    dimse_dimse_timeout_s: float = Field(default=60.0, gt=0, description="a DIMSE message to arrive")
    dimse_network_timeout_s: float = Field(default=60.0, gt=0, description="an idle association is closed")
    dimse_tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle: with TLS on, peers must present a certificate it signed (mutual TLS)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="the service's log level (the command line's --log-level wins)"
    )

    def backend_extra(self, name: str) -> dict[str, Any]:
        """The settings of backend ``name``: those named ``NAME_*``, with the prefix dropped."""
        prefix = f"{name}_"
        return {k[len(prefix) :]: v for k, v in self.model_dump().items() if k.startswith(prefix)}

    def bundles(self) -> list[ModelEntry]:
        """The model bundles to serve, in order (the first answers ``GET /v1/model``): ``models``, or
        ``model`` alone."""
        return list(self.models) if self.models else [ModelEntry(path=self.model)] if self.model else []

    def for_model(self, entry: ModelEntry) -> Settings:
        """The settings one model serves with: these, with the model's own ``backend`` when it has one."""
        return self if entry.backend is None else self.model_copy(update={"backend": entry.backend})

    def trusted(self) -> list[TrustedKey] | None:
        """The keys of ``trusted_keys`` (:mod:`retinaedge.runtime.signing`), None when it is not set;
        ConfigError naming a key that cannot be read."""
        from retinaedge.runtime.signing import parse_trusted_keys

        return parse_trusted_keys(self.trusted_keys)

    def link_params(self, has_operating_point: bool) -> LinkParams:
        """The series linking parameters (:class:`~retinaedge.runtime.findings.LinkParams`) for a bundle
        with or without an operating point (:func:`~retinaedge.runtime.findings.default_min_score`)."""
        return LinkParams(
            min_score=(
                default_min_score(has_operating_point)
                if self.series_min_score is None
                else self.series_min_score
            ),
            min_slices=self.series_min_slices,
            link_iou=self.series_link_iou,
            max_gap=self.series_max_gap,
        )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from retinaedge.runtime.backends.registry import choices

        known = choices()
        if v not in known:
            raise ValueError(f"Input should be one of {', '.join(repr(k) for k in known)}")
        return v

    @field_validator("export_destinations")
    @classmethod
    def _unique_names(cls, v: list[Any]) -> list[Any]:
        check_unique(v)
        return v

    @model_validator(mode="after")
    def _loopback_or_token(self) -> Settings:
        if (self.model is None) == (not self.models):
            raise ValueError(
                "set model (one bundle directory) or models (a list of them), not both"
                if self.model is not None
                else "no model: set model (RETINAEDGE_MODEL, serve --model DIR) or models (RETINAEDGE_MODELS)"
            )
        takes_sc = [d.name for d in self.export_destinations if "sc" in d.documents]
        if self.captures == "never" and takes_sc:
            raise ValueError(
                f"captures=never, but destination(s) {takes_sc} take sc (secondary captures): make them "
                "(captures=always) or take sc out of their documents"
            )
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes {bad} are outside 1..max_batch_size ({self.max_batch_size})"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both for HTTPS, or neither")
        if not is_loopback(self.host) and self.api_token is None:
            raise ValueError(
                f"refusing to bind {self.host}: beyond loopback an API token is required "
                "(set RETINAEDGE_API_TOKEN)"
            )
        if self.export_retry_max_s < self.export_retry_initial_s:
            raise ValueError("export_retry_max_s must be at least export_retry_initial_s")
        if self.api_token is not None and len(self.api_token.get_secret_value()) < 16:
            raise ValueError("the API token must be at least 16 characters")
        self._dimse_checks()
        return self

    def _dimse_checks(self) -> None:
        """The C-STORE SCP's settings (:mod:`.dimse`): titles, peers, no open SCP beyond loopback."""
        from retinaedge.service.dimse.peers import check_ae_title, parse_peers

        check_ae_title(self.dimse_ae_title, "dimse_ae_title")
        bound = list(self.dimse_ae_titles) + [t for m in self.models for t in m.ae_titles]
        for title in bound:
            check_ae_title(title, "an AE title bound to models")
        stripped = [t.strip() for t in bound]
        if self.dimse_ae_title.strip() in stripped:
            raise ValueError(f"{self.dimse_ae_title!r} is dimse_ae_title (every model): bind other titles")
        for m in self.models:
            if len({t.strip() for t in m.ae_titles} & {t.strip() for t in self.dimse_ae_titles}):
                raise ValueError("an AE title is bound both in models and in dimse_ae_titles: bind it once")
        parse_peers(self.dimse_allowed_aets)
        if self.dimse_port == 0:
            return
        if self.dimse_port == self.port:
            raise ValueError(f"dimse_port {self.dimse_port} is the HTTP port too")
        if not is_loopback(self.host) and not self.dimse_allowed_aets:
            raise ValueError(
                f"refusing to bind the DICOM port on {self.host}: beyond loopback dimse_allowed_aets must "
                """list the calling AE titles (RETINAEDGE_DIMSE_ALLOWED_AETS='["SCANNER1"]')"""
            )
        if self.dimse_tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "dimse_tls_ca_file needs tls_cert_file and tls_key_file (the SCP's own certificate)"
            )


def load_settings(**overrides: Any) -> Settings:
    """Defaults < config file (``RETINAEDGE_CONFIG_FILE``, JSON) < environment < ``overrides``
    (:mod:`retinaedge.runtime.settings_source`).

    Raises :class:`ConfigError` with every invalid field named.
    """
    merged = file_values_below_environment()
    token_file = os.environ.get("RETINAEDGE_API_TOKEN_FILE")
    if token_file and "api_token" not in environment_names() and overrides.get("api_token") is None:
        merged["api_token"] = read_token_file(Path(token_file))
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return build_settings(Settings, merged)


def read_token_file(path: Path) -> str:
    """The bearer token in ``path`` (a Docker or systemd secret; surrounding whitespace dropped)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"RETINAEDGE_API_TOKEN_FILE {path}: {exc}") from exc
    if not token:
        raise ConfigError(f"RETINAEDGE_API_TOKEN_FILE {path} is empty")
    return token
