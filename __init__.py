"""comfy-courier: a ComfyUI extension that runs web-backend jobs and reports them once.

ComfyUI imports this package from custom_nodes/. Importing it registers the node and
the routes; nothing starts until ComfyUI's server loop runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def _in_comfyui() -> bool:
    import sys

    return "server" in sys.modules and hasattr(sys.modules["server"], "PromptServer")


if _in_comfyui():
    from .wiring import setup

    setup()
