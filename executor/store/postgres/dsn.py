"""The connection string: TLS by default beyond loopback, and the poolers that cannot work.

Supabase offers three connection strings. The direct connection
(`db.<project>.supabase.co:5432`) and the session pooler (`<region>.pooler.supabase.com:5432`)
keep one server session per client connection: LISTEN/NOTIFY, session advisory locks and
prepared statements work. The transaction pooler (port 6543) hands each transaction to any
server session: notifications never arrive and the instance lock is lost at once, so it is
refused with a message saying which string to use instead.
"""

from __future__ import annotations

import ipaddress

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ...errors import NotConfigured

TRANSACTION_POOLER_PORT = "6543"
APPLICATION_NAME = "comfy-courier"


def is_loopback(host: str) -> bool:
    """A Unix socket, localhost, or a loopback address: TLS adds nothing there."""
    if not host or host.startswith("/") or host.startswith("@") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def prepare(url: str) -> str:
    """The conninfo to connect with: `sslmode=require` unless it names one or stays on
    loopback; refused (NotConfigured) for a transaction pooler or an unreadable string."""
    try:
        params = conninfo_to_dict(url)
    except Exception as e:  # psycopg.ProgrammingError: its message never holds the password
        raise NotConfigured(f"COURIER_DB is not a valid PostgreSQL connection string: {e}") from e
    hosts = str(params.get("host") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    if TRANSACTION_POOLER_PORT in ports or any(
        "pooler.supabase.com" in host and TRANSACTION_POOLER_PORT in ports for host in hosts
    ):
        raise NotConfigured(
            "COURIER_DB points at a transaction pooler (port 6543): it hands each transaction "
            "to another server session, so LISTEN/NOTIFY, the instance lock and session state "
            "break. Use Supabase's session pooler (the same host on port 5432) or the direct "
            "connection (db.<project>.supabase.co:5432)"
        )
    extra: dict[str, str] = {}
    if "sslmode" not in params and not all(is_loopback(host) for host in hosts):
        extra["sslmode"] = "require"
    if "application_name" not in params:
        extra["application_name"] = APPLICATION_NAME
    return make_conninfo(url, **extra)


def describe(url: str) -> str:
    """`host:port/dbname` for logs: never the user's password."""
    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "an unreadable PostgreSQL URL"
    host = params.get("host") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"
