"""Model zoo and registry: ``create_model(name, **cfg)``, ``list_models()``, ``from_module``."""

from .base import Model, create_model, from_module, list_models, register_model

__all__ = ["Model", "create_model", "from_module", "list_models", "register_model"]
