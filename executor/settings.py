"""Configuration from the environment: the only module that reads `os.environ`.

Settings are parsed leniently: every problem becomes one line in `Settings.problems`
(logged at start-up) and a safe value is used instead, so a typo never stops ComfyUI.
Secrets are kept out of `repr()` so a settings object can be logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

StorageKind = Literal["supabase", "local"]
UrlMode = Literal["public", "signed"]

_TRUE = {"1", "true", "yes", "on"}
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_FALSE = {"0", "false", "no", "off", ""}


def _split_list(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_keys: tuple[str, ...] = field(default=(), repr=False)
    callback_url: str | None = None
    callback_api_key: str | None = field(default=None, repr=False)
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    status_url: str | None = None
    storage: StorageKind = "local"
    supabase_url: str | None = None
    supabase_key: str | None = field(default=None, repr=False)
    bucket: str = "comfy-outputs"
    url_mode: UrlMode = "public"
    signed_url_ttl: int = 604800
    public_base_url: str | None = None
    db_path: Path | None = None
    db_url: str | None = field(default=None, repr=False)  # postgresql://…: several hosts
    db_schema: str = "courier"
    instance: str | None = None
    max_queue: int = 100
    job_timeout: float = 1800.0
    max_body_bytes: int = 10 * 1024 * 1024
    retry_horizon: float = 86400.0
    retention_days: float = 30.0  # 0: keep finished jobs forever
    max_attempts: int = 2
    takeover_after: float = 30.0  # s of heartbeat silence before a sibling takes jobs over
    progress_interval: float = 1.0
    keep_metadata: bool = False
    keep_outputs: bool = False  # keep a job's files in ComfyUI's output folder (remote storage)
    problems: tuple[str, ...] = ()

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for redaction and for the tests that hunt for leaks."""
        values = [*self.api_keys, *self.metrics_keys, *self.webhook_secrets]
        values += [v for v in (self.callback_api_key, self.supabase_key) if v]
        values += _url_passwords(self.db_url)
        return tuple(values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        problems: list[str] = []

        def text(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        def number(name: str, default: float, minimum: float, integer: bool = False) -> float:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = int(raw) if integer else float(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not a number; using {default:g}")
                return default
            if value < minimum:
                problems.append(f"{name}={raw!r} is below {minimum:g}; using {default:g}")
                return default
            return value

        def url(name: str) -> str | None:
            raw = text(name)
            if raw is None:
                return None
            if not re.match(r"^https?://[^/\s]+", raw):
                problems.append(f"{name} must be an http(s) URL; ignoring it")
                return None
            return raw.rstrip("/") if name in ("SUPABASE_URL", "COURIER_PUBLIC_BASE_URL") else raw

        api_keys = _split_list(environ.get("COURIER_API_KEY"))
        if not api_keys:
            problems.append("COURIER_API_KEY is not set: /execute-workflow answers 503 until it is")
        short = [k for k in api_keys if len(k) < 16]
        if short:
            problems.append(f"{len(short)} COURIER_API_KEY value(s) shorter than 16 characters")

        secrets = _split_list(environ.get("COURIER_WEBHOOK_SECRET"))
        valid_secrets = tuple(s for s in secrets if _valid_webhook_secret(s))
        if len(valid_secrets) != len(secrets):
            problems.append(
                "COURIER_WEBHOOK_SECRET: ignoring value(s) that are not base64 "
                "(expected 'whsec_<base64>'); callbacks go unsigned by them"
            )

        supabase_url = url("SUPABASE_URL")
        supabase_key = text("SUPABASE_SERVICE_ROLE_KEY")
        storage_raw = (text("COURIER_STORAGE") or "").lower()
        storage: StorageKind
        if storage_raw in ("supabase", "local"):
            storage = storage_raw  # type: ignore[assignment]
        else:
            if storage_raw:
                problems.append(f"COURIER_STORAGE={storage_raw!r} is not supabase or local")
            storage = "supabase" if supabase_url else "local"
        if storage == "supabase" and not (supabase_url and supabase_key):
            problems.append(
                "supabase storage needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY; "
                "using local storage"
            )
            storage = "local"

        url_mode_raw = (text("COURIER_URL_MODE") or "public").lower()
        url_mode: UrlMode = "public"
        if url_mode_raw == "signed":
            url_mode = "signed"
        elif url_mode_raw != "public":
            problems.append(f"COURIER_URL_MODE={url_mode_raw!r} is not public or signed")

        keep_outputs_raw = (text("COURIER_KEEP_OUTPUTS") or "0").lower()
        if keep_outputs_raw not in _TRUE | _FALSE:
            problems.append(f"COURIER_KEEP_OUTPUTS={keep_outputs_raw!r} is not 0 or 1; using 0")

        keep_raw = (text("COURIER_KEEP_METADATA") or "0").lower()
        if keep_raw not in _TRUE | _FALSE:
            problems.append(f"COURIER_KEEP_METADATA={keep_raw!r} is not 0 or 1; using 0")

        callback_url = url("COURIER_CALLBACK_URL")
        if (
            callback_url
            and callback_url.startswith("http://")
            and not re.match(r"^http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:|/|$)", callback_url)
        ):
            problems.append(
                "COURIER_CALLBACK_URL is plain http: callbacks and keys travel unencrypted"
            )
        if callback_url is None and "COURIER_CALLBACK_URL" not in environ:
            problems.append("COURIER_CALLBACK_URL is not set: jobs run, results only by polling")

        db = text("COURIER_DB")
        db_url = db if db and db.lower().startswith(POSTGRES_SCHEMES) else None
        db_schema = (text("COURIER_DB_SCHEMA") or "courier").lower()
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", db_schema) or db_schema == "public":
            problems.append(
                f"COURIER_DB_SCHEMA={db_schema!r} must be a plain name (letters, digits, _) "
                "and not public, which Supabase serves to anyone with the anon key; "
                "using courier"
            )
            db_schema = "courier"
        return cls(
            api_keys=api_keys,
            metrics_keys=_split_list(environ.get("COURIER_METRICS_KEY")),
            callback_url=callback_url,
            callback_api_key=text("COURIER_CALLBACK_API_KEY"),
            webhook_secrets=valid_secrets,
            status_url=url("COURIER_STATUS_URL"),
            storage=storage,
            supabase_url=supabase_url,
            supabase_key=supabase_key,
            bucket=text("COURIER_BUCKET") or "comfy-outputs",
            url_mode=url_mode,
            signed_url_ttl=int(number("COURIER_SIGNED_URL_TTL", 604800, 1, integer=True)),
            public_base_url=url("COURIER_PUBLIC_BASE_URL"),
            db_path=Path(db).expanduser() if db and not db_url else None,
            db_url=db_url,
            db_schema=db_schema,
            instance=text("COURIER_INSTANCE"),
            max_queue=int(number("COURIER_MAX_QUEUE", 100, 1, integer=True)),
            job_timeout=number("COURIER_JOB_TIMEOUT", 1800, 1),
            max_body_bytes=int(number("COURIER_MAX_BODY_MB", 10, 0.001) * 1024 * 1024),
            retry_horizon=number("COURIER_RETRY_HORIZON", 86400, 0),
            retention_days=number("COURIER_RETENTION_DAYS", 30, 0),
            max_attempts=int(number("COURIER_MAX_ATTEMPTS", 2, 1, integer=True)),
            takeover_after=number("COURIER_TAKEOVER_AFTER", 30, 1),
            progress_interval=number("COURIER_PROGRESS_INTERVAL", 1, 0),
            keep_metadata=keep_raw in _TRUE,
            keep_outputs=keep_outputs_raw in _TRUE,
            problems=tuple(problems),
        )


def _url_passwords(url: str | None) -> list[str]:
    """The password of a connection URL, as written and decoded (for redaction)."""
    if not url:
        return []
    from urllib.parse import parse_qs, unquote, urlsplit

    found: list[str] = []
    try:
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
        found += parse_qs(parts.query).get("password", [])
    except ValueError:
        return []
    return [p for raw in found for p in {raw, unquote(raw)} if p]


def _valid_webhook_secret(secret: str) -> bool:
    import base64
    import binascii

    body = secret.removeprefix("whsec_")
    try:
        return bool(base64.b64decode(body + "==", validate=False)) and bool(
            re.fullmatch(r"[A-Za-z0-9+/=]+", body)
        )
    except (binascii.Error, ValueError):
        return False
