"""The family registry (issue 17, item 1): every built-in name listed and built, `edgeflex export --model`
through it, `ef.export` sending an elastic model to its family's exporter, and refusing one it cannot place.

Models that always train (dress-*, snnet-*, the ETT ones: 45 s to minutes each) are checked for their
family and exporter without training; fits-etth1 alone trains one epoch, where the shared ETT data is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeflex as ef
from edgeflex import cli
from edgeflex.models import registry
from edgeflex.models.dress import DigitsMLP, DressModel
from edgeflex.models.ett import DEFAULT_DIR

BUILT_IN = ("fits", "starnet-s050", "starnet-s100", "starnet-s150", "starnet-s1", "starnet-s2", "starnet-s3",
            "starnet-s4", "dress-starnet-s050", "dress-mlp", "snnet-starnet", "fits-etth1", "fits-etth2",
            "fits-elastic-etth1")
EXPORTERS = {"fits": "export_plain", "fits-elastic": "export_fits_elastic", "starnet": "export_plain",
             "dress": "export_dress", "snnet": "export_snnet", "dlinear": "export_plain",
             "generic": "export_plain"}
HAS_ETT = (DEFAULT_DIR / "ETTh1.csv").is_file()


def test_the_registry_lists_every_built_in_model_and_the_cli_offers_them() -> None:
    assert [m.name for m in ef.models.list()] == list(BUILT_IN)
    assert cli.MODELS == BUILT_IN
    assert all(m.description and m.family in {f.name for f in ef.models.families()} for m in ef.models.list())


def test_each_family_names_its_own_classes_and_exporter() -> None:
    assert [f.name for f in registry.families()] == list(EXPORTERS)
    for f in registry.families():
        assert f.export_fn().__name__ == EXPORTERS[f.name], f.name
        assert f.elastic == (f.name in ("fits-elastic", "dress", "snnet")), f.name
        for ref in f.classes:
            cls = registry.resolve(ref)
            assert cls.family == f.name and f.matches(object.__new__(cls)), ref


def test_each_family_names_its_config_kind_and_its_quality_evaluation() -> None:
    from edgeflex.models.co2 import Windows
    from edgeflex.runtime.families import ConfigKind, kinds

    kinded = {f.name: registry.resolve(f.kind) for f in registry.families() if f.kind}
    assert {n: k.key for n, k in kinded.items()} == {"fits-elastic": "fits_level", "dress": "dress"}
    assert all(issubclass(k, ConfigKind) and kinds()[k.key] is k for k in kinded.values())
    metrics = {f.name: f.evaluation.metric for f in registry.families() if f.evaluation}
    assert metrics == {"fits": "mse", "fits-elastic": "mse", "starnet": "top1", "dress": "top1",
                       "snnet": "top1", "dlinear": "mse"}
    rng = np.random.default_rng(0)
    held = Windows(rng.standard_normal((5, 8, 2)), rng.standard_normal((5, 3, 2)))
    forecast = registry.get_family("fits").evaluation
    assert forecast.evaluate(lambda x: np.concatenate([x, np.zeros((5, 3, 2))], 1), held) == \
        pytest.approx(float((held.y ** 2).mean()))
    logits, labels = np.eye(4)[[0, 1, 2, 3, 0]], np.array([0, 1, 2, 0, 0])
    assert registry.get_family("starnet").evaluation.evaluate(lambda x: x, (logits, labels)) == 0.8


@pytest.mark.parametrize("name", [m.name for m in registry.list_models() if not m.always_trains])
def test_create_builds_each_untrained_model_and_the_registry_places_it(name: str) -> None:
    model, example, quality, meta, held = ef.models.create(name, image_size=32)
    assert quality is None and meta == {} and held is None
    assert registry.place(model).name == registry.get_model(name).family
    with torch.no_grad():
        assert torch.isfinite(model.eval()(example)).all()


@pytest.mark.parametrize("name", [m.name for m in registry.list_models() if m.always_trains])
def test_models_that_always_train_resolve_to_their_family_exporter(name: str) -> None:
    entry = registry.get_model(name)
    expected = {"dress-starnet-s050": "dress", "dress-mlp": "dress", "snnet-starnet": "snnet",
                "fits-etth1": "fits", "fits-etth2": "fits", "fits-elastic-etth1": "fits-elastic"}[name]
    assert entry.family == expected
    assert registry.get_family(entry.family).export_fn().__name__ == EXPORTERS[expected]
    assert callable(registry.resolve(entry.builder))


def test_an_unknown_model_name_is_refused_in_one_line() -> None:
    with pytest.raises(ef.UsageError, match=r"unknown model 'nope'; expected one of: fits, starnet-s050"):
        ef.models.create("nope")


@pytest.mark.parametrize("argv", [
    ["--model", "fits"],
    ["--model", "starnet-s050", "--image-size", "32"],
    pytest.param(["--model", "fits-etth1", "--epochs", "1"],
                 marks=pytest.mark.skipif(not HAS_ETT, reason="shared ETT data not present")),
])
def test_edgeflex_export_writes_the_model_through_its_family(capsys, tmp_path: Path, argv) -> None:
    out = tmp_path / "m.efx"
    assert cli.main(["export", *argv, "--out", str(out)]) == 0, capsys.readouterr().err
    bundle = ef.Bundle.open(out)
    entry = registry.get_model(argv[1])
    assert bundle.family == entry.family
    assert (len(bundle.configs) > 1) == registry.get_family(entry.family).elastic
    assert capsys.readouterr().out.startswith(f"wrote {out}")


def test_edgeflex_models_prints_every_name_with_its_family(capsys) -> None:
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "family", "description"]
    assert [line.split()[:2] for line in lines[2:]] == [[m.name, m.family] for m in registry.list_models()]


def test_ef_export_sends_a_dress_model_to_the_dress_exporter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DressModel(DigitsMLP()).eval()
    bundle = ef.export(model, torch.randn(2, 1, 8, 8), tmp_path / "mlp.efx")
    assert bundle.family == "dress" and "dress" in bundle.manifest
    assert len(bundle.configs) == len(model.levels) > 1        # a level each, not one config


def test_n_random_is_refused_for_an_exporter_that_does_not_take_it(tmp_path: Path) -> None:
    with pytest.raises(ef.ExportError, match="n_random=9: the dress exporter"):
        ef.export(DressModel(DigitsMLP()), torch.randn(2, 1, 8, 8), tmp_path / "x.efx", n_random=9)
    assert not (tmp_path / "x.efx").exists()


class _Levels(nn.Linear):
    """Elastic-looking (a `set_level`) but of no registered family."""

    def set_level(self, level: int) -> _Levels:
        return self


class _ClaimsDress(nn.Linear):
    family = "dress"


@pytest.mark.parametrize("model, why", [
    (_Levels(4, 2), "it looks elastic (has 'set_level')"),
    (_ClaimsDress(4, 2), "its family 'dress' is elastic but _ClaimsDress")])
def test_an_elastic_looking_model_no_family_places_is_refused_in_one_line(tmp_path: Path, model, why) -> None:
    with pytest.raises(ef.ExportError) as e:
        ef.export(model, torch.randn(2, 4), tmp_path / "x.efx")
    msg = str(e.value)
    assert "\n" not in msg and why in msg and "register_family" in msg
    assert all(f"{f} (" in msg for f in ("fits-elastic", "dress", "snnet"))
    assert not (tmp_path / "x.efx").exists()


class _Named(nn.Linear):
    family = "my-linear"      # a family the registry does not know, and nothing elastic: generic


def test_a_plain_module_of_an_unknown_family_is_captured_as_before(tmp_path: Path) -> None:
    bundle = ef.export(_Named(4, 2), torch.randn(2, 4), tmp_path / "x.efx")
    assert bundle.family == "my-linear" and len(bundle.configs) == 1
    assert registry.place(_Named(4, 2)).name == "generic"


class _Toy(nn.Linear):
    family = "toy"


CALLS: list[str] = []


def _toy_export(model, example, path, **kw):
    from edgeflex.export.core import export_plain

    CALLS.append(type(model).__name__)
    return export_plain(model, example, path, **kw)


def test_a_registered_family_gets_its_models_from_ef_export(tmp_path: Path, monkeypatch) -> None:
    registry.families()                                  # the built-ins read, then copied: undone after
    monkeypatch.setattr(registry, "_families", dict(registry._families))
    monkeypatch.setattr(registry, "_models", dict(registry._models))
    registry.register_family(registry.Family("toy", (f"{__name__}:_Toy",), f"{__name__}:_toy_export"))
    assert [f.name for f in registry.families()][-2:] == ["toy", "generic"]
    with pytest.raises(ef.UsageError, match="already registered"):
        registry.register_family(registry.Family("toy", ()))
    bundle = ef.export(_Toy(4, 2), torch.randn(2, 4), tmp_path / "toy.efx")
    assert CALLS == ["_Toy"] and bundle.family == "toy"


def test_models_list_works_where_torch_cannot_be_imported(tmp_path: Path) -> None:
    from test_board_light import SITECUSTOMIZE

    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = ("import sys, edgeflex as ef; names = [m.name for m in ef.models.list()]; "
            "assert 'torch' not in sys.modules; print(' '.join(names))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert r.returncode == 0 and r.stdout.split() == list(BUILT_IN), r.stderr
    r = subprocess.run([sys.executable, "-m", "edgeflex", "models"], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
    assert r.returncode == 0 and "fits-elastic-etth1" in r.stdout, r.stderr
