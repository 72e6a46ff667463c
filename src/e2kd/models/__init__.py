"""Models: a registry of small-input and ImageNet-size networks (standard and B-cos)."""

from ._registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]
