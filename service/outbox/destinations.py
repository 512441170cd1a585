"""Export destinations (setting ``export_destinations``): where result documents (DICOM SR) are pushed.

Each destination is a JSON object with a unique ``name`` and a ``type``, one of the destination types
(:data:`DESTINATION_TYPES`, the one list of them: the settings, ``/v1/exports`` and the senders read it):

- ``dimse``: a DICOM C-STORE SCP (a PACS, a viewer): ``ae_title``, ``host``, ``port``, the calling AE
  title ``calling_ae_title`` and optional ``tls`` (the DICOM TLS profile: CA file, client certificate
  and key).
- ``stowrs``: a DICOMweb STOW-RS service: ``url`` (the DICOMweb root; ``/studies`` is appended),
  optional ``auth`` (``bearer`` or ``basic``) whose secret is read from a file or an environment
  variable when a request is made, never from the settings themselves, and optional ``ca_file``.

Both take ``documents``: the result documents the destination receives, by kind (default ``["sr"]``;
the kinds result delivery sends: ``sr``, each instance's SR, and ``series-sr``, the series SR once the
series is complete; :mod:`retinaedge.service.results.documents`). The older members ``instance_sr``
(default true) and ``series_sr`` (default false) are still accepted instead of ``documents`` and mean
``sr`` and ``series-sr``. Secrets never appear in the settings, in logs or in ``/v1/exports``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from retinaedge.service.results.documents import DOCUMENTS

#: A destination name: it appears in metrics labels, logs and ``/v1/exports``.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: An AE title: 1-16 characters of the default character repertoire, no backslash, not all spaces.
AE_TITLE = re.compile(r"^[ -\[\]-~]{1,16}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The older spelling of ``documents``: each flag and the kind it means (with its default).
OLDER_FLAGS = {"instance_sr": ("sr", True), "series_sr": ("series-sr", False)}
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


class _Common(_Strict):
    name: str = Field(description="unique name (metrics label, logs, /v1/exports)")
    documents: list[str] = Field(
        default_factory=lambda: ["sr"],
        description=f"the result documents it receives, by kind ({', '.join(DOCUMENTS.deliverable())})",
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="connect and response timeout")

    @model_validator(mode="before")
    @classmethod
    def _older_flags(cls, data: Any) -> Any:
        """``instance_sr`` / ``series_sr`` (the settings before ``documents``) -> ``documents``."""
        if not isinstance(data, dict) or not OLDER_FLAGS.keys() & data.keys():
            return data
        if "documents" in data:
            raise ValueError(
                "give documents, or instance_sr/series_sr (its older spelling), not both: "
                'instance_sr is "sr" in documents, series_sr "series-sr"'
            )
        data = dict(data)
        kinds = []
        for flag, (kind, default) in OLDER_FLAGS.items():
            try:
                on = _BOOL.validate_python(data.pop(flag, default))
            except ValidationError:
                raise ValueError(f"{flag} must be true or false") from None
            if on:
                kinds.append(kind)
        data["documents"] = kinds
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("a destination name is 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("documents")
    @classmethod
    def _documents(cls, v: list[str]) -> list[str]:
        deliverable = DOCUMENTS.deliverable()
        for kind in v:
            if kind not in deliverable:
                known = "" if kind not in DOCUMENTS else f" ({kind!r} is not delivered by result export)"
                raise ValueError(
                    f"{kind!r} is not a result document that export delivers{known}; "
                    f"it delivers: {', '.join(deliverable)}"
                )
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _something(self) -> _Common:
        if not self.documents:
            raise ValueError(
                f"destination {self.name!r} sends nothing: list the documents it receives "
                f"({', '.join(DOCUMENTS.deliverable())}), or set instance_sr or series_sr"
            )
        return self

    @property
    def instance_sr(self) -> bool:
        """It receives each instance's SR (``sr``): the older flag, derived."""
        return "sr" in self.documents

    @property
    def series_sr(self) -> bool:
        """It receives each complete series' SR (``series-sr``): the older flag, derived."""
        return "series-sr" in self.documents


class DimseTls(_Strict):
    """DICOM TLS for a C-STORE destination: the peer's certificate is verified against ``ca_file``
    (and its host name, unless ``check_hostname`` is false); ``cert_file``/``key_file`` are ours."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> DimseTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls cert_file and key_file go together")
        return self


def _ae_title(v: str) -> str:
    if not AE_TITLE.match(v) or not v.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters, no backslash, not all spaces")
    return v


class DimseDestination(_Common):
    """A C-STORE SCP."""

    type: Literal["dimse"]
    ae_title: str = Field(description="the peer's (called) AE title")
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str = Field(default="RETINAEDGE", description="our AE title in the association")
    tls: DimseTls | None = None

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _ae_title(v)

    def target(self) -> str:
        """Where it goes, for people: ``AE@host:port``."""
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


class Auth(_Strict):
    """HTTP authentication for STOW-RS. The secret (the token, or the password) is read from
    ``secret_file`` or the environment variable ``secret_env`` at each request (so it can rotate)."""

    type: Literal["bearer", "basic"]
    username: str | None = Field(default=None, description="basic only")
    secret_file: Path | None = None
    secret_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Auth:
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError("auth needs exactly one of secret_file and secret_env")
        if (self.type == "basic") != (self.username is not None):
            raise ValueError("auth username is required for basic and not used for bearer")
        if self.username is not None and ":" in self.username:
            raise ValueError("a basic auth username cannot contain ':'")
        return self

    def secret(self) -> str:
        """The secret now; raises ``ValueError`` saying where it was looked for (never what it is)."""
        if self.secret_file is not None:
            try:
                value = self.secret_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"auth secret_file {self.secret_file}: {type(exc).__name__}") from None
            where = f"secret_file {self.secret_file}"
        else:
            assert self.secret_env is not None
            value = os.environ.get(self.secret_env, "").strip()
            where = f"environment variable {self.secret_env}"
        if not value:
            raise ValueError(f"auth {where} is empty or missing")
        return value


class StowRsDestination(_Common):
    """A DICOMweb STOW-RS service."""

    type: Literal["stowrs"]
    url: str = Field(description="the DICOMweb root, e.g. https://pacs.example/dicom-web")
    auth: Auth | None = None
    ca_file: Path | None = Field(default=None, description="CA bundle for https (default: the system's)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http:// or https:// with a host")
        if parts.username or parts.password:
            raise ValueError("url must not carry credentials: use auth with secret_file or secret_env")
        if parts.query or parts.fragment:
            raise ValueError("url must not have a query or fragment")
        return v.rstrip("/")

    def target(self) -> str:
        return self.url


Destination = DimseDestination | StowRsDestination
"""The destination types: one class each, named by its ``type`` member. A new type is a class here,
added to this union, plus its sender (:data:`retinaedge.service.outbox.senders.SENDERS`)."""
DESTINATION_TYPES: tuple[type[DimseDestination] | type[StowRsDestination], ...] = get_args(Destination)
#: The ``type`` names, in the order of :data:`DESTINATION_TYPES`.
TYPE_NAMES: tuple[str, ...] = tuple(get_args(c.model_fields["type"].annotation)[0] for c in DESTINATION_TYPES)
DeliveryDestination = Annotated[Destination, Field(discriminator="type")]


def _known_type(v: str) -> str:
    if v not in TYPE_NAMES:
        raise ValueError(f"not a destination type: {', '.join(TYPE_NAMES)}")
    return v


#: A destination type's name, as a response member (its JSON schema an enum of :data:`TYPE_NAMES`).
TypeName = Annotated[
    str, AfterValidator(_known_type), WithJsonSchema({"type": "string", "enum": list(TYPE_NAMES)})
]


def check_unique(destinations: list[Destination]) -> None:
    """Raise ``ValueError`` when two destinations share a name."""
    seen: set[str] = set()
    for d in destinations:
        if d.name in seen:
            raise ValueError(f"export destination name {d.name!r} is used twice")
        seen.add(d.name)
