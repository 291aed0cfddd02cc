"""Test-wide set-up: offline before any HF import, and the `slow` marker."""
from pipelines.offline import configure_environment

configure_environment(online=False)
