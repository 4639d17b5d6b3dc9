"""The model registry: each family is one `Family` record, each built-in model name one `ModelEntry`.

Owns recognising a model's family (`place`), the exporter each family writes its bundle with, its quality
evaluation, and the built-in names (`create`, `list_models`). Imports no torch: builders, exporters and
evaluations are named as "module:function" and imported when called, so `ef.models.list()` works on a board.
The built-in plug-ins are the tables in `models/plugins.py`. A family's board-side half (its typed config
fields and load-time planner) is its config kind in `runtime/families/`, which `Family.kind` names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edgeflex.errors import ExportError, UsageError

PLAIN_EXPORTER = "edgeflex.export.core:export_plain"   # one config: a lowering (FITS) or torch.onnx capture
# An object with one of these, and no family that places it, looks elastic: it is refused, not captured as
# one config (a DRESS-like model exported as one graph would silently lose its levels).
ELASTIC_MARKERS = ("config_names", "set_config", "set_level", "set_cut", "cut_freqs")


def resolve(ref: str) -> Callable:
    """The object a "module:attribute" reference names, imported now."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Evaluation:
    """How a family's quality is measured: `metric` (as its builders' quality dicts name it) on `data`, the
    shipped held-out split its builders return, computed by `fn`: "module:function" (NumPy only), called as
    fn(run, held_out) -> float, `run` a function of a NumPy batch (`Runtime.run`, or a wrapped PyTorch
    model)."""

    metric: str
    data: str
    fn: str

    def evaluate(self, run: Callable[[Any], Any], held_out: Any) -> float:
        return resolve(self.fn)(run, held_out)


@dataclass(frozen=True)
class Family:
    """A kind of model. `classes`: "module:QualName" of the model classes it owns (subclasses too);
    `exporter`: "module:function" called as fn(model, example, path, *, name, quality, tolerance, threads,
    metadata, overwrite[, n_random]) -> Bundle, `example` one tensor for an elastic family (a tensor or a
    tuple otherwise); `elastic`: its bundles hold several configs; `kind`: "module:Class" of its config
    kind on the board side (`runtime.families`: the typed fields its configs carry and their load-time
    planner; registered there, as the board never imports this registry), "" when its configs need none
    (a plain graph, a chain of segments); `evaluation`: its quality evaluation."""

    name: str
    classes: tuple[str, ...]
    exporter: str = PLAIN_EXPORTER
    elastic: bool = False
    description: str = ""
    kind: str = ""
    evaluation: Evaluation | None = None

    def matches(self, model: object) -> bool:
        mro = {f"{c.__module__}:{c.__qualname__}" for c in type(model).__mro__}
        return any(c in mro for c in self.classes)

    def export_fn(self) -> Callable:
        return resolve(self.exporter)


class Built(NamedTuple):
    """What a builder returns: the model, an example input (batch first), its held-out quality (None when
    untrained; per config for an elastic family), bundle metadata, and the held-out data (or None)."""

    model: Any
    example: Any
    quality: Any
    metadata: dict
    held_out: Any


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model name. `builder`: "module:function" called as fn(entry, *, train, epochs, seed,
    image_size, horizon, data, progress) -> Built; `settings`: its variant as data; `always_trains`: it is
    only built trained (its quality is per config, or it needs its data set)."""

    name: str
    family: str
    description: str
    builder: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    always_trains: bool = False


_families: dict[str, Family] = {}
_models: dict[str, ModelEntry] = {}


def _builtins() -> None:
    if not _families:
        plugins = importlib.import_module("edgeflex.models.plugins")   # the built-in tables; torch-free
        for f in plugins.FAMILIES:
            _families[f.name] = f
        for m in plugins.MODELS:
            _models[m.name] = m


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add a family: `ef.export` then sends models of its classes to its exporter."""
    _builtins()
    if family.name in _families and not replace:
        raise UsageError(f"family {family.name!r} is already registered; pass replace=True to replace it")
    _families[family.name] = family
    if "generic" in _families and family.name != "generic":   # generic stays last: it matches nothing
        _families["generic"] = _families.pop("generic")
    return family


def register_model(entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
    """Add a model name for `create` and `edgeflex export --model` (its family must be registered)."""
    _builtins()
    if entry.family not in _families:
        raise UsageError(f"model {entry.name!r}: family {entry.family!r} is not registered; expected one of "
                         f"{', '.join(_families)} (register_family first)")
    if entry.name in _models and not replace:
        raise UsageError(f"model {entry.name!r} is already registered; pass replace=True to replace it")
    _models[entry.name] = entry
    return entry


def families() -> list[Family]:
    """The registered families, in the order `place` tries them ("generic" last)."""
    _builtins()
    return list(_families.values())


def list_models() -> list[ModelEntry]:
    """Every registered model name (name, family, description, settings), in registration order."""
    _builtins()
    return list(_models.values())


def _lookup(kind: str, table: dict, name: str):
    _builtins()
    if name not in table:
        raise UsageError(f"unknown {kind} {name!r}; expected one of: {', '.join(table)}")
    return table[name]


def get_family(name: str) -> Family:
    return _lookup("family", _families, name)


def get_model(name: str) -> ModelEntry:
    return _lookup("model", _models, name)


def create(name: str, *, train: bool = False, epochs: int | None = None, seed: int = 0,
           image_size: int | None = None, horizon: int | None = None, data: str | None = None,
           progress: bool = True) -> Built:
    """Build the named model: (model, example, quality, metadata, held-out data). Untrained unless `train`
    or the entry always trains (dress-*, snnet-*, the ETT models)."""
    entry = get_model(name)
    return resolve(entry.builder)(entry, train=train, epochs=epochs, seed=seed, image_size=image_size,
                                  horizon=horizon, data=data, progress=progress)


def place(model: object) -> Family:
    """The family whose exporter writes `model`'s bundle. The rule, in order:
    1. the first registered family owning the model's class (or a base class) places it;
    2. a model whose `family` attribute names a registered elastic family it is not an instance of, or that
       has an elastic marker (a `config_names`, `set_config`, `set_level`, `set_cut` or `cut_freqs`
       attribute), is refused in one ExportError line: exported as one graph it would lose its configs;
    3. anything else is "generic": one config, captured by torch.onnx (its `family` attribute, if any, is
       recorded in the manifest)."""
    _builtins()
    for f in _families.values():
        if f.matches(model):
            return f
    what = type(model).__name__
    claimed = getattr(model, "family", None)
    elastic = [f for f in _families.values() if f.elastic]
    known = "; ".join(f"{f.name} ({', '.join(c.rpartition(':')[2] for c in f.classes)})" for f in elastic)
    fix = ("subclass that family's model class, or register the model's family with "
           "edgeflex.models.register_family")
    if isinstance(claimed, str) and claimed in _families and _families[claimed].elastic:
        raise ExportError(f"cannot export {what}: its family {claimed!r} is elastic but {what} is not one "
                          f"of that family's classes; registered elastic families: {known}; {fix}")
    marks = [m for m in ELASTIC_MARKERS if hasattr(model, m)]
    if marks:
        raise ExportError(f"cannot export {what}: it looks elastic (has {marks[0]!r}) but no registered "
                          f"family places it (family {claimed!r}); registered elastic families: {known}; "
                          f"{fix}")
    return _families["generic"]
