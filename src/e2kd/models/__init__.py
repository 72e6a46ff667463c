"""Models: a registry of small-input and ImageNet-size networks (standard and B-cos)."""

from ._registry import create_model, is_model, list_models, register_model
from .weights import load_weights, read_state_dict

__all__ = ["create_model", "is_model", "list_models", "load_weights", "read_state_dict", "register_model"]
