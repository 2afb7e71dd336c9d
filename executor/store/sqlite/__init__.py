"""The SQLite journal: one file on a local disk, shared by the ComfyUI processes of a host.

`journal.py` holds the SQL; `process.py` runs it in a child process (the default),
`thread.py` on a thread (the fallback); `store.py` makes either a `Store`.
"""

from __future__ import annotations

from pathlib import Path

from .process import JournalProcess
from .store import SqliteStore
from .thread import JournalThread, Opener


def open_sqlite(path: Path | str, *, on_thread: bool = False) -> SqliteStore:
    """The journal at `path`; `on_thread` keeps it in this process (tests patch it there)."""
    runner = JournalThread(Opener(path)) if on_thread else JournalProcess(path)
    return SqliteStore(runner, path)


__all__ = ["JournalProcess", "JournalThread", "SqliteStore", "open_sqlite"]
