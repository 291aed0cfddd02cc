"""What extensions add to the engine (samplers, ControlNet preprocessors), as one immutable value.

The app builds it once from the loaded extensions (`ExtensionSet.additions()`), keeps it on the
AppContext, and every GenerationRequest built by the UI or the API carries it
(`request.additions`), so validation and scheduler / control-map construction see the same
tables without any module-level registry. `NO_ADDITIONS` is Easel on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.control.preprocessors import PreprocessorTable
from pipelines.samplers import SamplerTable


@dataclass(frozen=True)
class EngineAdditions:
    samplers: SamplerTable = field(default_factory=SamplerTable)
    preprocessors: PreprocessorTable = field(default_factory=PreprocessorTable)


NO_ADDITIONS = EngineAdditions()  # immutable, so one shared instance is safe
