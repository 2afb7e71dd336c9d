"""The Postgres store: several GPU hosts sharing one database (`COURIER_DB=postgresql://…`).

psycopg is an optional dependency (`pip install 'comfy-courier[postgres]'`): the SQLite
journal, the embedded default, needs nothing beyond the standard library. `open_postgres`
says so plainly when it is missing; nothing here imports psycopg before that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import NotConfigured

if TYPE_CHECKING:
    from .store import PostgresStore

INSTALL_HINT = (
    "COURIER_DB is a PostgreSQL URL but psycopg is not installed in ComfyUI's Python: "
    "run `<ComfyUI's python> -m pip install 'psycopg[binary]>=3.2,<4' 'psycopg-pool>=3.2,<4'` "
    "(or pip install 'comfy-courier[postgres]') and restart ComfyUI"
)


def open_postgres(url: str, schema: str = "courier") -> PostgresStore:
    """The store on the database at `url`, in `schema`; connects on first use."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as e:
        raise NotConfigured(f"{INSTALL_HINT} ({e})") from e
    from .store import PostgresStore

    return PostgresStore(url, schema)


__all__ = ["INSTALL_HINT", "open_postgres"]
