"""Export destinations (setting ``export_destinations``): where results are pushed as DICOM SR.

Each destination is a JSON object with a unique ``name`` and a ``type``:

- ``dimse``: a DICOM C-STORE SCP (a PACS, a viewer): ``ae_title``, ``host``, ``port``, the calling AE
  title ``calling_ae_title`` and optional ``tls`` (the DICOM TLS profile: CA file, client certificate
  and key).
- ``stowrs``: a DICOMweb STOW-RS service: ``url`` (the DICOMweb root; ``/studies`` is appended),
  optional ``auth`` (``bearer`` or ``basic``) whose secret is read from a file or an environment
  variable when a request is made, never from the settings themselves, and optional ``ca_file``.

Both take ``instance_sr`` (each instance's SR, default true) and ``series_sr`` (the series SR once the
series is complete, default false). Secrets never appear in the settings, in logs or in ``/v1/exports``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: A destination name: it appears in metrics labels, logs and ``/v1/exports``.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: An AE title: 1-16 characters of the default character repertoire, no backslash, not all spaces.
AE_TITLE = re.compile(r"^[ -\[\]-~]{1,16}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Common(_Strict):
    name: str = Field(description="unique name (metrics label, logs, /v1/exports)")
    instance_sr: bool = Field(default=True, description="send each instance's SR")
    series_sr: bool = Field(default=False, description="send the series SR once the series is complete")
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="connect and response timeout")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("a destination name is 1-64 letters, digits, '_', '.' or '-'")
        return v

    @model_validator(mode="after")
    def _something(self) -> _Common:
        if not (self.instance_sr or self.series_sr):
            raise ValueError(f"destination {self.name!r} sends nothing: set instance_sr or series_sr")
        return self


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


ExportDestination = Annotated[DimseDestination | StowRsDestination, Field(discriminator="type")]


def check_unique(destinations: list[DimseDestination | StowRsDestination]) -> None:
    """Raise ``ValueError`` when two destinations share a name."""
    seen: set[str] = set()
    for d in destinations:
        if d.name in seen:
            raise ValueError(f"export destination name {d.name!r} is used twice")
        seen.add(d.name)
