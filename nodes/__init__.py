"""The nodes comfy-courier adds to ComfyUI. Node ids are stable; display names may change."""

from .save_and_callback import SaveAndCallback

NODE_CLASS_MAPPINGS: dict[str, type] = {"SaveAndCallback": SaveAndCallback}
NODE_DISPLAY_NAME_MAPPINGS = {"SaveAndCallback": "Save and Callback (courier)"}
