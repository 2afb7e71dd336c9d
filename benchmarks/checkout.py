"""This checkout as every benchmark process sees it: its folders, how to import it, shared keys."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TESTS = REPO / "tests"
SHARED_WORKFLOWS = REPO.parent / "shared" / "workflows"

API_KEY = "bench-inbound-key-0123456789abcdef"
CALLBACK_KEY = "bench-callback-key-0123456789abcdef"
SERVICE_KEY = "bench-service-role-key-0123456789"
BUCKET = "comfy-outputs"
# Standard Webhooks secret: whsec_ + base64 of 24 bytes
WEBHOOK_SECRET = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQtMDEyMzQ1"


def use_repo_package() -> None:
    """Import `comfy_courier` from this checkout (not whatever copy pip installed), and
    make tests/ importable for the stand-in and the fake storage server."""
    mod = sys.modules.get("comfy_courier")
    if mod is None or Path(getattr(mod, "__file__", "") or "").resolve().parent != REPO:
        stale = [n for n in sys.modules if n == "comfy_courier" or n.startswith("comfy_courier.")]
        for name in stale:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "comfy_courier", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfy_courier"] = module
        spec.loader.exec_module(module)
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
