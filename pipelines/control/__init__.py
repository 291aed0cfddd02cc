"""Control units: ControlNet (and later T2I-Adapter / IP-Adapter) conditioning for a request.

units.py (the ControlUnit data), preprocessors.py (image -> control map), models.py (loading,
base-model families), apply.py (joining the active pipeline for one generation).
"""
from pipelines.control.units import CONTROL_MODES, RESIZE_MODES, ControlUnit, units_from_infotext

__all__ = ["CONTROL_MODES", "RESIZE_MODES", "ControlUnit", "units_from_infotext"]
