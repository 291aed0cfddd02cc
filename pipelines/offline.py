"""Offline-by-default environment. Must run before huggingface_hub / diffusers / transformers
are imported, because huggingface_hub reads HF_HUB_OFFLINE once at import time."""
import os


def configure_environment(online: bool = False, environ=os.environ) -> None:
    environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    environ.setdefault("DISABLE_TELEMETRY", "1")
    if online:
        environ.pop("HF_HUB_OFFLINE", None)
    else:
        environ["HF_HUB_OFFLINE"] = "1"
        environ["TRANSFORMERS_OFFLINE"] = "1"
