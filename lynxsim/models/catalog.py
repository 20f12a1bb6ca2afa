"""The catalog of real MoE architectures, one YAML data file per model in ``catalog/``.

Model shapes are data, not code, so that every number sits next to the public config it came from (``source``)
and the published total it is checked against (``published_total_params``). Adding a model means adding a file.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from lynxsim.errors import InputError
from lynxsim.models.spec import ModelSpec
from lynxsim.yaml_input import read_yaml_mapping, validated

_CATALOG_DIR = "catalog"
_BYTES_PER_MB = 1e6
_BYTES_PER_GB = 1e9
_PARAMS_PER_B = 1e9


def _catalog_files() -> dict[str, Path]:
    """Catalog key (file stem) to YAML path, read from the installed package so wheels work too."""
    root = resources.files("lynxsim.models").joinpath(_CATALOG_DIR)
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}


def catalog_names() -> list[str]:
    """Keys accepted by :func:`load_catalog_model`, sorted."""
    return sorted(_catalog_files())


def model_spec_from_dict(data: dict[str, Any], where: str) -> ModelSpec:
    """Validate ``data`` into a ModelSpec, turning pydantic's error into an InputError that names ``where``
    (a file) and the key path of the first bad field, so a typo in a data file reads as one line."""
    return validated(ModelSpec, data, where)


def load_model_file(path: str | Path) -> ModelSpec:
    """Read one model YAML file (a catalog entry or a user's own) into a ModelSpec."""
    return model_spec_from_dict(read_yaml_mapping(path, "model file"), str(path))


@cache
def load_catalog_model(key: str) -> ModelSpec:
    """The catalog model named ``key`` (see :func:`catalog_names`). Cached: specs are immutable."""
    files = _catalog_files()
    if key not in files:
        raise InputError("model", f"{key!r} is not in the catalog; known models: {', '.join(sorted(files))}")
    return load_model_file(files[key])


def catalog_summary() -> pd.DataFrame:
    """One row per catalog model with the numbers a user compares models by (``lynxsim models``).

    ``total_rel_error`` is (computed - published) / published total parameters: it shows how far the parameter
    formulas in ``spec.py`` are from the model card. MB and GB are decimal (1e6, 1e9 bytes).
    """
    rows = []
    for key in catalog_names():
        m = load_catalog_model(key)
        published = m.published_total_params
        rows.append(
            {
                "key": key,
                "name": m.name,
                "layers": m.num_layers,
                "moe_layers": m.num_moe_layers,
                "experts": m.num_experts,
                "top_k": m.top_k,
                "shared_experts": m.num_shared_experts,
                "expert_mb": m.expert_bytes / _BYTES_PER_MB,
                "total_params_b": m.total_params / _PARAMS_PER_B,
                "active_params_b": m.active_params / _PARAMS_PER_B,
                "published_total_b": published / _PARAMS_PER_B if published else None,
                "total_rel_error": (m.total_params - published) / published if published else None,
                "weight_gb": m.weight_bytes / _BYTES_PER_GB,
                "kv_bytes_per_token": m.kv_bytes_per_token,
                "lynx_alpha": m.lynx_alpha,
                "lynx_beta": m.lynx_beta,
            }
        )
    return pd.DataFrame(rows)
