"""Local storage: files under ComfyUI's output folder, served by ComfyUI's own `/view`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlencode

from ..errors import StorageError

SUBFOLDER = "courier"


class LocalStorage:
    kind = "local"

    def __init__(self, output_dir: Path, base_url: Callable[[], str]) -> None:
        self._root = Path(output_dir) / SUBFOLDER
        self._base_url = base_url

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        relative = PurePosixPath(key)
        if relative.is_absolute() or ".." in relative.parts:
            raise StorageError(f"refusing object key outside the output folder: {key!r}", False)
        target = self._root.joinpath(*relative.parts)
        try:
            await asyncio.to_thread(_write_atomically, target, data)
        except OSError as e:
            raise StorageError(f"could not write {target.name}: {e.strerror or e}", True) from e
        subfolder = "/".join((SUBFOLDER, *relative.parts[:-1]))
        query = urlencode({"filename": relative.name, "subfolder": subfolder, "type": "output"})
        return f"{self._base_url()}/view?{query}"


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
