"""Model shapes: the ModelSpec schema, the catalog of real MoE architectures, and import from Hugging Face configs."""

from lynxsim.models.catalog import catalog_names, catalog_summary, load_catalog_model, load_model_file
from lynxsim.models.hf_config import model_from_hf_config
from lynxsim.models.spec import AttentionSpec, ModelSpec

__all__ = [
    "AttentionSpec",
    "ModelSpec",
    "catalog_names",
    "catalog_summary",
    "load_catalog_model",
    "load_model_file",
    "model_from_hf_config",
]
