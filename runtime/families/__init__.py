"""The families' typed config fields and load-time planners, on the board side: torch-free, NumPy only.

A family whose configs need fields of their own (DRESS: a level and its kernel; elastic FITS: a cut
frequency and its GEMM form) has one module here with a `ConfigKind`: a frozen dataclass stored under its
`key` in the config's JSON, parsed and written by the generic `from_json`/`to_json` below, and its `plan`
(config -> the steps to run, weights derived at load). `Config.from_json` finds a config's kind by key here
and `runtime.plan.build_plans` calls its `plan`, so neither names a family. Not the families' builders and
exporters (`models/`, `export/`), which the board never imports.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from edgeflex.errors import BundleError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from ..bundle import Bundle, Config
    from ..plan import Plan

# The built-in kinds, "module:Class", imported on first use (the registry reads no family module before).
BUILTIN = ("edgeflex.runtime.families.dress:DressLevel", "edgeflex.runtime.families.fits_elastic:FitsLevel")


@dataclasses.dataclass(frozen=True)
class ConfigKind:
    """A family's typed config fields: subclass as a frozen dataclass whose fields are the keys of the JSON
    object under `key` (a field defaulting to None is optional, and not written while None), and give it a
    `plan`. Keys the dataclass does not know are kept in `unknown`, written back as they were."""

    key: ClassVar[str]
    unknown: Mapping[str, Any] = dataclasses.field(default_factory=dict, kw_only=True, repr=False,
                                                    compare=False)

    @classmethod
    def from_json(cls, d: Any, where: str = "config") -> ConfigKind:
        """Parse the JSON object under `key`, checking each field against its annotation; a wrong or
        missing field is one BundleError line naming it."""
        path = f"{where}.{cls.key}"
        if not isinstance(d, dict):
            raise BundleError(f"{path} is {_short(d)}, expected an object; re-export the bundle")
        hints = typing.get_type_hints(cls)
        values, names = {}, set()
        for f in dataclasses.fields(cls):
            if f.name == "unknown":
                continue
            names.add(f.name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in d:
                if required:
                    raise BundleError(f"{path}.{f.name} is missing, expected {_describe(hints[f.name])}; "
                                      "re-export the bundle")
                continue
            if not _is(d[f.name], hints[f.name]):
                raise BundleError(f"{path}.{f.name} is {_short(d[f.name])}, expected "
                                  f"{_describe(hints[f.name])}; re-export the bundle")
            values[f.name] = d[f.name]
        return cls(**values, unknown={k: v for k, v in d.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.unknown}

    def plan(self, bundle: Bundle, config: Config, tensors: dict[str, np.ndarray],
             kernel: str | None) -> Plan:
        """The config's plan: its steps, with the weights it derives from `tensors` (the bundle's stored
        tensors, read once). `kernel`: the kernel asked for at load where the family offers several (None
        keeps the exporter's choice)."""
        raise NotImplementedError


_kinds: dict[str, type[ConfigKind]] = {}


def _builtins() -> None:
    if not _kinds:
        for ref in BUILTIN:
            module, _, attr = ref.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            _kinds[cls.key] = cls


def register_kind(cls: type[ConfigKind], *, replace: bool = False) -> type[ConfigKind]:
    """Add a family's config kind: configs with its `key` then parse into it and plan with its `plan`."""
    _builtins()
    if not (isinstance(cls, type) and issubclass(cls, ConfigKind) and dataclasses.is_dataclass(cls)):
        raise UsageError(f"register_kind expects a ConfigKind dataclass, got {cls!r}")
    if cls.key in _kinds and _kinds[cls.key] is not cls and not replace:
        raise UsageError(f"config kind {cls.key!r} is already registered; pass replace=True to replace it")
    _kinds[cls.key] = cls
    return cls


def kinds() -> dict[str, type[ConfigKind]]:
    """The registered config kinds by their JSON key."""
    _builtins()
    return dict(_kinds)


def parse_kind(d: dict[str, Any], where: str) -> ConfigKind | None:
    """The kind of a config's JSON object `d` (None for a plain or chained config); more than one kind's
    key is refused in one BundleError line."""
    _builtins()
    found = [k for k in d if k in _kinds]
    if len(found) > 1:
        raise BundleError(f"{where} has the fields of several families ({', '.join(found)}), expected at "
                          "most one; re-export the bundle")
    return _kinds[found[0]].from_json(d[found[0]], where) if found else None


# --- checking a JSON value against a field's annotation -----------------------------------------------------

def _is(v: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return any(type(v) is type(a) and v == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_is(v, a) for a in args)
    if hint is type(None):
        return v is None
    if hint is bool:
        return type(v) is bool
    if hint is int:
        return type(v) is int                       # not bool: True == 1
    if hint is float:
        return type(v) in (int, float)
    if hint is str:
        return isinstance(v, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(v, list) and (not args or all(_is(x, args[0]) for x in v))
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        return isinstance(v, dict) and (not args or all(_is(k, args[0]) and _is(x, args[1])
                                                         for k, x in v.items()))
    raise TypeError(f"config kind field annotation {hint!r} is not one the JSON parse checks")


_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _describe(hint: Any) -> str:
    """An annotation in the words of the JSON it admits: `int | None` -> "an int or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint in _NAMES:
        return _NAMES[hint]
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return "a list" + (f" ({_describe(args[0])} each)" if args else "")
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        return "an object" + (f" ({_describe(args[1])} each)" if args and args[1] is not Any else "")
    return "any value" if hint is Any else str(hint)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 48 else s[:45] + "..."
