"""Hugging Face <-> jaxtrain weights."""

from jaxtrain.convert.hf_mpt import export_hf, hf_config_from_model, import_hf, model_config_from_hf, save_model

__all__ = ["export_hf", "hf_config_from_model", "import_hf", "model_config_from_hf", "save_model"]
