"""comfy-courier: a ComfyUI extension that runs web-backend jobs and reports them once.

ComfyUI imports this package from custom_nodes/. Importing it registers the node and
the routes; nothing starts until ComfyUI's server loop runs.
"""

import sys

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

# Only a package import inside ComfyUI registers anything. Elsewhere (tests, tools,
# `python -m comfy_courier`) nothing is wired and the node's numpy/Pillow are not needed;
# pytest may even import this file alone, without a package, when the checkout's folder
# name is not a valid package name.
if __package__ and "server" in sys.modules and hasattr(sys.modules["server"], "PromptServer"):
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    from .wiring import setup

    setup()
