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
        self._output = Path(output_dir)
        self._root = self._output / SUBFOLDER
        self._base_url = base_url

    def url_of_file(self, path: Path) -> str | None:
        """The node's own file, served as it is: no second copy under courier/."""
        try:
            relative = PurePosixPath(Path(path).resolve().relative_to(self._output.resolve()))
        except ValueError:
            return None  # not in ComfyUI's output folder
        return self._view_url(relative.name, "/".join(relative.parts[:-1]))

    def _view_url(self, filename: str, subfolder: str) -> str:
        query = urlencode({"filename": filename, "subfolder": subfolder, "type": "output"})
        return f"{self._base_url()}/view?{query}"

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        relative = PurePosixPath(key)
        if relative.is_absolute() or ".." in relative.parts:
            raise StorageError(f"refusing object key outside the output folder: {key!r}", False)
        target = self._root.joinpath(*relative.parts)
        try:
            await asyncio.to_thread(_write_atomically, target, data)
        except OSError as e:
            raise StorageError(f"could not write {target.name}: {e.strerror or e}", True) from e
        return self._view_url(relative.name, "/".join((SUBFOLDER, *relative.parts[:-1])))


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
