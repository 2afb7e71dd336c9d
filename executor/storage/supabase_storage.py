"""Supabase Storage through the official async client: upsert uploads, public or signed URLs.

`check()` (run at start-up) and `ensure_bucket()` (the `bucket create` helper) make sure the
bucket exists with the visibility COURIER_URL_MODE needs: a private bucket in public mode
would turn every job into a `success` whose URL answers 400 "Bucket not found".
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

import httpx

from ..errors import StorageError
from ..quiet_http import QuietAsyncClient
from .aiohttp_transport import AiohttpTransport

# Answers worth trying again: the server or something in between was momentarily unable.
_RETRYABLE_STATUS = {"408", "425", "429", "500", "502", "503", "504"}
# What the node and SaveImage deliver; a bucket that refuses one fails those uploads.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
FIX_HINT = (
    "run `python custom_nodes/comfy-courier/cli.py bucket create` with ComfyUI's "
    "environment, or the SQL in the README"
)


class SupabaseStorage:
    kind = "supabase"

    def __init__(
        self,
        url: str,
        key: str,
        bucket: str,
        url_mode: Literal["public", "signed"] = "public",
        signed_url_ttl: int = 604800,
        timeout: float = 60.0,
    ) -> None:
        self._url = url
        self._key = key
        self._bucket = bucket
        self._url_mode = url_mode
        self._ttl = signed_url_ttl
        self._timeout = timeout
        self._client: Any = None
        self._http: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def _storage_api(self) -> Any:
        # Created lazily on the server loop: the async client binds to the loop it runs on.
        async with self._lock:
            if self._client is None:
                from supabase import AsyncClientOptions, acreate_client

                # Our own httpx client: its timeout bounds every upload, the client's
                # deprecated timeout/verify arguments stay unused, and its requests stay
                # out of ComfyUI's INFO log (quiet_http.py). Its requests go out over
                # aiohttp: half the loop's CPU per upload (aiohttp_transport.py).
                self._http = QuietAsyncClient(
                    timeout=self._timeout, follow_redirects=True, transport=AiohttpTransport()
                )
                options = AsyncClientOptions(httpx_client=self._http)
                self._client = await acreate_client(self._url, self._key, options=options)
        return self._client.storage

    async def _bucket_api(self) -> Any:
        return (await self._storage_api()).from_(self._bucket)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def url_of_file(self, path: Path) -> str | None:
        return None  # always an upload

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        from storage3.exceptions import StorageApiError

        try:
            bucket = await self._bucket_api()
            await bucket.upload(
                key,
                data,
                file_options={
                    "content-type": content_type,
                    "upsert": "true",
                    "cache-control": "3600",
                },
            )
            if self._url_mode == "signed":
                signed = await bucket.create_signed_url(key, self._ttl)
                return str(signed.get("signedURL") or signed.get("signedUrl"))
            return str(await bucket.get_public_url(key))
        except StorageApiError as e:
            status = str(getattr(e, "status", "") or "")
            message = f"Supabase Storage refused {key}: {status} {getattr(e, 'message', e)}"
            if status == "404" and "bucket" in str(getattr(e, "message", "")).lower():
                message += f" (COURIER_BUCKET={self._bucket!r}; to create it, {FIX_HINT})"
            raise StorageError(
                message,
                retryable=status in _RETRYABLE_STATUS or status.startswith("5"),
            ) from e
        except httpx.HTTPError as e:
            raise StorageError(
                f"Supabase Storage unreachable: {type(e).__name__}: {e}", True
            ) from e
        except (ValueError, TypeError, KeyError) as e:
            # the client answers a non-JSON 5xx page with a decoding error
            raise StorageError(f"Supabase Storage answered unexpectedly: {e}", True) from e

    # -- the bucket ---------------------------------------------------------------------

    @property
    def _wants_public(self) -> bool:
        return self._url_mode == "public"

    async def _get_bucket(self) -> Any | None:
        """The bucket's record, None if it does not exist; StorageError on other failures."""
        from storage3.exceptions import StorageApiError

        try:
            return await (await self._storage_api()).get_bucket(self._bucket)
        except StorageApiError as e:
            status = str(getattr(e, "status", "") or "")
            if status == "404":
                return None
            detail = f"{status} {getattr(e, 'message', e)}".strip()
            if status in ("401", "403"):
                raise StorageError(
                    f"Supabase Storage refused SUPABASE_SERVICE_ROLE_KEY ({detail}): every "
                    "upload will fail; use the project's service_role key",
                    False,
                ) from e
            raise StorageError(f"Supabase Storage answered {detail}", True) from e
        except httpx.HTTPError as e:
            raise StorageError(
                f"cannot reach Supabase Storage at {self._url}: {type(e).__name__}: {e}", True
            ) from e
        except (ValueError, TypeError, KeyError) as e:
            raise StorageError(f"Supabase Storage answered unexpectedly: {e}", True) from e

    async def check(self) -> list[str]:
        """What would make uploads fail or their URLs not work; [] when all is well."""
        try:
            bucket = await self._get_bucket()
        except StorageError as e:
            return [f"cannot check bucket {self._bucket!r}: {e.message}"]
        name = repr(self._bucket)
        if bucket is None:
            return [
                f"Supabase Storage has no bucket {name} (COURIER_BUCKET): every upload will "
                f"fail; to create it, {FIX_HINT}"
            ]
        problems = []
        if self._wants_public and not bucket.public:
            problems.append(
                f"bucket {name} is private but COURIER_URL_MODE=public: every image URL "
                f"would answer 400 'Bucket not found'; to make it public, {FIX_HINT}; or set "
                "COURIER_URL_MODE=signed"
            )
        if not self._wants_public and bucket.public:
            problems.append(
                f"bucket {name} is public but COURIER_URL_MODE=signed: anyone who learns an "
                f"image's path can read it without a signature; to make it private, {FIX_HINT}"
            )
        refused = [t for t in IMAGE_TYPES if not _allows(bucket.allowed_mime_types, t)]
        if refused:
            problems.append(
                f"bucket {name} accepts only {', '.join(bucket.allowed_mime_types)}: uploads of "
                f"{', '.join(refused)} will fail (its allowed MIME types in Supabase)"
            )
        return problems

    async def ensure_bucket(self) -> str:
        """Create the bucket, or set its visibility, as COURIER_URL_MODE needs; what was done."""
        from storage3.exceptions import StorageApiError

        visibility = "public" if self._wants_public else "private"
        bucket = await self._get_bucket()
        try:
            api = await self._storage_api()
            if bucket is None:
                await api.create_bucket(self._bucket, options={"public": self._wants_public})
                return f"created the {visibility} bucket {self._bucket!r}"
            if bool(bucket.public) != self._wants_public:
                await api.update_bucket(self._bucket, {"public": self._wants_public})
                return f"made the bucket {self._bucket!r} {visibility}"
        except StorageApiError as e:
            detail = f"{getattr(e, 'status', '')} {getattr(e, 'message', e)}".strip()
            raise StorageError(f"Supabase Storage refused: {detail}", False) from e
        except httpx.HTTPError as e:
            raise StorageError(f"Supabase Storage unreachable: {type(e).__name__}", True) from e
        return f"the bucket {self._bucket!r} exists and is {visibility} already"


def _allows(allowed: list[str] | None, content_type: str) -> bool:
    if not allowed:
        return True  # no list: every type
    family = content_type.split("/")[0]
    return any(t in (content_type, f"{family}/*", "*/*", "*") for t in allowed)
