"""A config's typed fields: every family's config JSON parses into them and writes back unchanged, manifests
written before the fields were typed still load, a wrong field is one BundleError line, and a family's
kind (its fields and its planner) plugs in without an edit to the runtime."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import edgeflex as ef
from edgeflex.runtime import families
from edgeflex.runtime.bundle import MANIFEST, Config, Fused
from edgeflex.runtime.families import ConfigKind, register_kind
from edgeflex.runtime.families.dress import DressLevel
from edgeflex.runtime.families.fits_elastic import FitsLevel
from edgeflex.runtime.plan import Plan, Step
from edgeflex.runtime.schema import seal_manifest

COSTS = {"per_kind": {"gemm": {"flops": 4096.0, "nodes": 1.0}}, "total": {"flops": 4096.0}, "engine_calls": 1}

# Config objects as the exporters wrote them before the fields were typed (copied from bundles written then;
# costs shortened): the JSON layout is unchanged, so these are also what they write now.
WRITTEN = {
    "plain": {"name": "default", "graph": "graphs/main.onnx",
              "quality": {"metric": "mse", "value": 0.0047, "direction": "lower", "split": "test",
                          "baseline": {"name": "seasonal naive (period 52)", "value": 0.031},
                          "data": "statsmodels co2"},
              "flops": 45968, "param_bytes": 93600, "costs": COSTS},
    "snnet": {"name": "s050>s100@1", "segments": ["s050.stem", "stitch.0", "s100.tail"],
              "quality": {"metric": "top1", "value": 0.5, "direction": "higher"}, "costs": COSTS,
              "flops": 1000, "param_bytes": 2000,
              "fused": {"graph": "graphs/fused/s050_s100_1.onnx", "tensors": {"w0": "t0", "w1": "t3"}}},
    "dress": {"name": "density-50", "segments": ["main"], "costs": COSTS,
              "dress": {"level": 1, "density": 0.5, "kernel": "dense",
                        "measured_ms_batch1": {"dense": 0.0164, "sparse": 0.4782}, "threads": 2},
              "quality": None, "flops": 87040, "param_bytes": 176168},
    "fits-elastic": {"name": "cut-30", "segments": ["cut-30"], "quality": None, "flops": 43068,
                     "param_bytes": 9920,
                     "fits_level": {"cut_freq": 30, "up_freq": 40, "parameters": 1240, "form": "folded",
                                    "derived": ["spectral.gemm0"], "engine_bytes": 29288,
                                    "measured": {"folded": {"batch1_us": 15.5, "batch64_us": 110.2}},
                                    "threads": 2}},
}


@pytest.mark.parametrize("family", list(WRITTEN))
def test_every_familys_config_json_round_trips_through_the_typed_fields(family: str) -> None:
    d = WRITTEN[family]
    c = Config.from_json(json.loads(json.dumps(d)))
    assert c.to_json() == d
    assert c.unknown == {}                          # every key written is a typed field
    assert Config.from_json(c.to_json()) == c


def test_the_typed_fields_read_as_the_field_names() -> None:
    plain, sn, dress, fe = (Config.from_json(WRITTEN[f]) for f in WRITTEN)
    assert plain.graph == "graphs/main.onnx" and plain.costs == COSTS and plain.kind is None
    assert plain.segments == () and plain.fused is None
    assert sn.segments == ("s050.stem", "stitch.0", "s100.tail") and sn.kind is None
    assert sn.fused == Fused("graphs/fused/s050_s100_1.onnx", {"w0": "t0", "w1": "t3"})
    assert dress.kind == DressLevel(1, "dense", 0.5, {"dense": 0.0164, "sparse": 0.4782}, 2)
    assert (fe.kind.cut_freq, fe.kind.form, fe.kind.derived) == (30, "folded", ["spectral.gemm0"])
    assert isinstance(fe.kind, FitsLevel) and fe.kind.key == "fits_level"
    with pytest.raises(FrozenInstanceError):
        dress.kind.level = 2


def test_keys_no_field_knows_are_kept_and_written_back() -> None:
    d = json.loads(json.dumps(WRITTEN["dress"]))
    d["note"] = {"by": "a newer edgeflex"}
    d["dress"]["calibration"] = [1, 2]
    c = Config.from_json(d)
    assert c.unknown == {"note": {"by": "a newer edgeflex"}}
    assert c.kind.unknown == {"calibration": [1, 2]} and c.kind.level == 1
    assert c.to_json() == d


def test_the_built_bundles_configs_round_trip(fits_bundle: Path, snnet_bundle) -> None:
    for path in (fits_bundle, snnet_bundle[1]):
        b = ef.Bundle.open(path)
        assert [c.to_json() for c in b.configs] == b.manifest["configs"]
    sn = ef.Bundle.open(snnet_bundle[1])
    assert all(c.fused is not None and len(c.segments) >= 1 and c.costs for c in sn.configs)


def _edit(path: Path, edit) -> None:
    m = json.loads((path / MANIFEST).read_text())
    edit(m)
    (path / MANIFEST).write_text(json.dumps(seal_manifest(m)))


def _open_fails(path: Path) -> str:
    with pytest.raises(ef.BundleError) as info:
        ef.Bundle.open(path)
    msg = str(info.value)
    assert "\n" not in msg and "re-export" in msg, msg
    return msg


def test_a_bundle_with_keys_this_edgeflex_does_not_know_still_loads_and_runs(copy: Path) -> None:
    x = np.random.default_rng(0).standard_normal((1, *ef.Bundle.open(copy).inputs[0].shape[1:]))
    x = x.astype(np.float32)
    before = ef.Runtime(copy).run(x)
    _edit(copy, lambda m: m["configs"][0].update(calibrated_on="a newer edgeflex"))
    rt = ef.Runtime(copy)
    assert rt.configs[0].unknown == {"calibrated_on": "a newer edgeflex"}
    assert rt.info()["configs"][0]["calibrated_on"] == "a newer edgeflex"
    np.testing.assert_array_equal(rt.run(x), before)


@dataclass(frozen=True)
class Doubled(ConfigKind):
    """A made-up family: its configs run the bundle's one segment, and say by how much they scale."""

    key: ClassVar[str] = "doubled"
    factor: int
    note: str | None = None

    def plan(self, bundle, config, tensors, kernel):
        (name,) = config.segments
        seg = bundle.segments[name]
        return Plan(config, (Step((name,), seg.graph, bundle.inputs, bundle.outputs),))


@pytest.fixture
def kinds(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(families, "_kinds", families.kinds())       # registrations end with the test
    return register_kind(Doubled)


def _as_doubled(m: dict, value) -> None:
    """The FITS bundle's one graph as a segment, planned by the "doubled" kind."""
    c = m["configs"][0]
    m["segments"] = {"main": {"graph": c.pop("graph")}}
    c.update(segments=["main"], doubled=value)


def test_a_registered_family_kind_parses_and_plans_without_an_edit_to_the_runtime(copy: Path, kinds) -> None:
    x = np.random.default_rng(0).standard_normal((2, *ef.Bundle.open(copy).inputs[0].shape[1:]))
    x = x.astype(np.float32)
    before = ef.Runtime(copy).run(x)
    _edit(copy, lambda m: _as_doubled(m, {"factor": 2}))
    rt = ef.Runtime(copy)
    assert rt.configs[0].kind == Doubled(2) and rt.graphs() == ("graphs/main.onnx",)
    assert rt.configs[0].to_json()["doubled"] == {"factor": 2}
    np.testing.assert_array_equal(rt.run(x), before)


@pytest.mark.parametrize(("value", "says"), [
    ({"factor": "2"}, "doubled.factor is '2', expected an int;"),
    ({"factor": True}, "doubled.factor is True, expected an int;"),
    ({}, "doubled.factor is missing, expected an int;"),
    ({"factor": 2, "note": 3}, "doubled.note is 3, expected a string or null;"),
    ([2], "doubled is [2], expected an object"),
])
def test_a_bad_typed_field_is_one_bundle_error_line(copy: Path, kinds, value, says: str) -> None:
    _edit(copy, lambda m: _as_doubled(m, value))
    msg = _open_fails(copy)
    assert says in msg and "manifest.json: config 'default'" in msg, msg


@pytest.mark.parametrize(("edit", "says"), [
    (lambda k: k.update(level="1"), "dress.level is '1', expected an int;"),
    (lambda k: k.pop("kernel"), "dress.kernel is missing, expected one of 'dense', 'sparse';"),
    (lambda k: k.update(kernel="fast"), "dress.kernel is 'fast', expected one of 'dense', 'sparse';"),
    (lambda k: k.update(threads=2.0), "dress.threads is 2.0, expected an int or null;"),
    (lambda k: k.update(measured_ms_batch1={"dense": "fast"}),
     "dress.measured_ms_batch1 is {'dense': 'fast'}, expected an object (a number each) or null;"),
])
def test_a_bad_built_in_family_field_is_one_bundle_error_line(edit, says: str) -> None:
    d = json.loads(json.dumps(WRITTEN["dress"]))
    edit(d["dress"])
    with pytest.raises(ef.BundleError) as info:
        Config.from_json(d, "b.efx/manifest.json: config")
    msg = str(info.value)
    assert msg.startswith("b.efx/manifest.json: config 'density-50'.dress.") and says in msg, msg
    assert "\n" not in msg and msg.endswith("re-export the bundle")


def test_a_bad_built_in_family_field_fails_at_open(copy: Path) -> None:
    # the schema checks the built-in families' fields (and what they name) when the bundle is opened
    _edit(copy, lambda m: m["configs"][0].update(dress={"level": "1", "kernel": "dense"}))
    assert "configs[0].dress.level is '1'" in _open_fails(copy)


def test_a_config_with_two_families_fields_is_refused() -> None:
    d = {**WRITTEN["dress"], "fits_level": WRITTEN["fits-elastic"]["fits_level"]}
    with pytest.raises(ef.BundleError, match="config 'density-50' has the fields of several families "
                                             r"\(dress, fits_level\)"):
        Config.from_json(d)


def test_registering_a_kind_checks_it(kinds) -> None:
    with pytest.raises(ef.UsageError, match="already registered"):
        @dataclass(frozen=True)
        class Other(ConfigKind):
            key: ClassVar[str] = "doubled"
        register_kind(Other)
    with pytest.raises(ef.UsageError, match="expects a ConfigKind dataclass"):
        register_kind(dict)
    assert set(families.kinds()) >= {"dress", "fits_level", "doubled"}
