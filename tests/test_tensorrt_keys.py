"""TensorRT plan keys, stale plans and API path selection: pure, run without TensorRT."""

import pytest

from runtime.backends.tensorrt_keys import api_path, plan_dir, plan_key, stale_reason


def test_plan_dir_keyed_by_gpu_capability_version():
    key = plan_key("Orin (nvgpu)", (8, 7), "10.3.0")
    assert plan_dir(key) == "engines/tensorrt/orin-nvgpu-sm87-10.3.0"


def test_stale_plan_named():
    here = plan_key("Orin", (8, 7), "10.3.0")
    assert stale_reason(dict(here), here) is None
    assert "no plan" in stale_reason(None, here)
    other = plan_key("Orin", (8, 7), "10.7.0")
    assert "tensorrt" in stale_reason(other, here)
    assert "gpu" in stale_reason(plan_key("H100", (9, 0), "10.3.0"), here)


def test_api_path():
    assert api_path("10.3.0") == "10.x"
    assert api_path("11.2.0") == "11.x"
    with pytest.raises(ValueError):
        api_path("8.6.1")
