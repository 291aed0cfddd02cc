"""The architectures Easel can tell apart, shared by the registry, the configs and the loaders."""
from enum import Enum


class Arch(str, Enum):
    SD1 = "sd1"
    SD1_INPAINT = "sd1-inpaint"
    SD2 = "sd2"
    SD2_V = "sd2-v"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    TINYWORLD = "tinyworld"
    UNKNOWN = "unknown"

    @property
    def is_sdxl(self) -> bool:
        return self in (Arch.SDXL, Arch.SDXL_REFINER)

    @property
    def vae_scaling_factor(self) -> float:
        # Standalone VAE files do not carry this; it belongs to the pipeline they join.
        return 0.13025 if self.is_sdxl else 0.18215
