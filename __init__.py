"""comfy-courier: a ComfyUI extension that runs web-backend jobs and reports them once.

ComfyUI imports this package from custom_nodes/. Importing it registers the node and
the routes; nothing starts until ComfyUI's server loop runs.
"""

import sys

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

# pytest may import this file on its own (as `__init__`, no package) when the checkout's
# folder name is not a valid package name; only a package import registers anything.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    if "server" in sys.modules and hasattr(sys.modules["server"], "PromptServer"):
        from .wiring import setup

        setup()
