"""The PyTorch model families and their registry: `ef.models.list()`, `ef.models.create(name)`.

Importing this package imports no torch (the registry names builders and exporters, imported when called).
"""

from .registry import (
    Built,
    Evaluation,
    Family,
    ModelEntry,
    create,
    families,
    get_family,
    get_model,
    list_models,
    place,
    register_family,
    register_model,
)

list = list_models      # `ef.models.list()`, as issue 17 names it (the builtin is not used in this module)

__all__ = ["Built", "Evaluation", "Family", "ModelEntry", "create", "families", "get_family", "get_model",
           "list", "list_models", "place", "register_family", "register_model"]
