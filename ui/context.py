"""AppContext: everything a tab needs, passed in explicitly (no global `shared` module)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.additions import NO_ADDITIONS
from pipelines.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    registry: Any  # pipelines.registry.ModelRegistry
    manager: Any  # pipelines.manager.PipelineManager
    jobs: Any  # pipelines.jobs.JobQueue
    outputs: Any  # pipelines.outputs.OutputStore
    presets: list = field(default_factory=list)  # ui.presets.Preset, for per-model defaults
    authenticator: Any = None  # pipelines.access.Authenticator when a login is required
    extensions: Any = None  # extensions.loader.ExtensionSet
    restart: Any = None  # callable that restarts the app (set by app.main); None: restart by hand
    prompts: Any = None  # pipelines.prompts.source.PromptSource: styles and wildcards
    additions: Any = NO_ADDITIONS  # pipelines.additions.EngineAdditions: extensions' samplers, preprocessors
