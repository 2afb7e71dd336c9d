"""Supabase Storage through the official async client: upsert uploads, public or signed URLs."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import httpx

from ..errors import StorageError

# Answers worth trying again: the server or something in between was momentarily unable.
_RETRYABLE_STATUS = {"408", "425", "429", "500", "502", "503", "504"}


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
        self._lock = asyncio.Lock()

    async def _bucket_api(self) -> Any:
        # Created lazily on the server loop: the async client binds to the loop it runs on.
        async with self._lock:
            if self._client is None:
                from supabase import AsyncClientOptions, acreate_client

                # Our own httpx client: its timeout bounds every upload, and the client's
                # deprecated timeout/verify arguments stay unused.
                http = httpx.AsyncClient(timeout=self._timeout, follow_redirects=True)
                options = AsyncClientOptions(httpx_client=http)
                self._client = await acreate_client(self._url, self._key, options=options)
        return self._client.storage.from_(self._bucket)

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
            raise StorageError(
                f"Supabase Storage refused {key}: {status} {getattr(e, 'message', e)}",
                retryable=status in _RETRYABLE_STATUS or status.startswith("5"),
            ) from e
        except httpx.HTTPError as e:
            raise StorageError(
                f"Supabase Storage unreachable: {type(e).__name__}: {e}", True
            ) from e
        except (ValueError, TypeError, KeyError) as e:
            # the client answers a non-JSON 5xx page with a decoding error
            raise StorageError(f"Supabase Storage answered unexpectedly: {e}", True) from e
