"""Models: native transformers MoE models adapted to UB-SMoE (and, later, MoEfied dense models).

transformers is imported only when a model is built or loaded, so `ubsmoe.models` imports without it.
"""

from ubsmoe.models.native import (
    NATIVE_FAMILIES,
    FamilySpec,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
    adapt_moe_model,
    family_spec,
    load_moe_model,
    supported_families,
    tiny_config,
)

__all__ = [
    "NATIVE_FAMILIES",
    "FamilySpec",
    "ModelLoadError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "adapt_moe_model",
    "family_spec",
    "load_moe_model",
    "supported_families",
    "tiny_config",
]
