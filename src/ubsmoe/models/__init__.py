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

from ubsmoe.models.state import (  # noqa: E402
    AdapterStateError,
    ExportError,
    LoadResult,
    export_merged,
    load_trainable_state,
    read_adapter_config,
    save_trainable_state,
    trainable_state,
)

__all__ += [
    "AdapterStateError",
    "ExportError",
    "LoadResult",
    "export_merged",
    "load_trainable_state",
    "read_adapter_config",
    "save_trainable_state",
    "trainable_state",
]

from ubsmoe.models.embedded import (  # noqa: E402
    EmbeddedModelConversionError,
    EmbeddedModelUnavailableError,
    embedded_default_path,
    load_embedded_default,
)

__all__ += [
    "EmbeddedModelConversionError",
    "EmbeddedModelUnavailableError",
    "embedded_default_path",
    "load_embedded_default",
]

from ubsmoe.models.moefication import (  # noqa: E402
    DENSE_FAMILIES,
    MoEficationConfig,
    MoEfiedBlock,
    load_moefied,
    moefied_blocks,
    moefy,
    moefy_cached,
    save_moefied,
)

__all__ += [
    "DENSE_FAMILIES",
    "MoEficationConfig",
    "MoEfiedBlock",
    "load_moefied",
    "moefied_blocks",
    "moefy",
    "moefy_cached",
    "save_moefied",
]
