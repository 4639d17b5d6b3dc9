"""Pure helpers of the TensorRT backend (issue 23): plan keys, stale plans, API path, and the plans' place
in a bundle (names, records, the trust rule, atomic storing).

No tensorrt import: these run anywhere, so the rules are tested where TensorRT is absent.
A TensorRT plan is specific to the GPU model and the TensorRT version; a plan recorded for
another GPU, compute capability or version is stale: rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

import numpy as np

from edgeflex.errors import BundleError

from ..bundle import Bundle, model_id, sha256_bytes, update_bundle
from .tvm import created_here, untrusted

log = logging.getLogger(__name__)

ENGINES = "engines/tensorrt"
RECORD_FORMAT = "edgeflex-tensorrt-plan"
REBUILD = "rebuild: TensorRtBackend(build='always')"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def plan_key(gpu: str, capability: tuple[int, int], trt_version: str) -> dict[str, str]:
    """What a stored plan is keyed by."""
    return {"gpu": gpu, "capability": f"{capability[0]}.{capability[1]}", "tensorrt": trt_version}


def plan_dir(key: dict[str, str]) -> str:
    """engines/tensorrt/<gpu>-sm<cc>-<trt version>/ inside the bundle."""
    cc = key["capability"].replace(".", "")
    return f"{ENGINES}/{_slug(key['gpu'])}-sm{cc}-{_slug(key['tensorrt'])}"


def stale_reason(record: dict[str, Any] | None, here: dict[str, str]) -> str | None:
    """None when the recorded plan was built for this GPU and TensorRT; else one line why not."""
    if record is None:
        return "no plan built for this GPU and TensorRT version"
    for field in ("gpu", "capability", "tensorrt"):
        if record.get(field) != here[field]:
            return f"plan built for {field} {record.get(field)!r}, this machine has {here[field]!r}"
    return None


def api_path(trt_version: str) -> str:
    """'10.x' (BuilderFlag.FP16 exists, weakly typed allowed) or '11.x' (strongly typed only)."""
    major = int(trt_version.split(".")[0])
    if major < 10:
        raise ValueError(f"TensorRT {trt_version} is older than 10.0, which edgeflex requires")
    return "10.x" if major == 10 else "11.x"


def plan_file(key: dict[str, str], graph_sha: str, weights_sha: str | None, precision: str,
              max_batch: int) -> str:
    """`<plan dir>/<graph sha256[:16]>[-w<weights sha256[:12]>]-<precision>-b<max batch>.plan`: one plan per
    graph, weights (a refittable plan is refitted only with the weights it was built with), precision and
    batch range."""
    w = f"-w{weights_sha[:12]}" if weights_sha else ""
    return f"{plan_dir(key)}/{graph_sha[:16]}{w}-{precision}-b{max_batch}.plan"


def record_file(plan: str) -> str:
    return plan.removesuffix(".plan") + ".json"


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """What a refittable plan is keyed by besides its graph: each weight's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def read_record(bundle: Bundle, rel: str) -> dict[str, Any]:
    """A plan record, checked for the fields the backend reads (one-line BundleError)."""
    from .. import schema

    rec = schema.load_json(f"bundle file {rel!r}", bundle.read(rel), REBUILD)
    need = {"format": str, "graph_sha256": str, "plan": str, "plan_sha256": str, "key": dict,
            "stripped": bool, "refit": bool}
    for field, kind in need.items():
        if not isinstance(rec, dict) or not isinstance(rec.get(field), kind):
            raise BundleError(f"bundle file {rel!r}: TensorRT plan record lacks {field!r} ({kind.__name__}); "
                              f"{REBUILD}")
    if rec["format"] != RECORD_FORMAT or rec["plan"] not in bundle.manifest["files"]:
        raise BundleError(f"bundle file {rel!r}: not a TensorRT plan record, or its plan {rec['plan']!r} is "
                          f"not in the bundle; {REBUILD}")
    return rec


def plan_records(bundle: Bundle, key: dict[str, str], *, allow_native: bool) -> dict[str, dict[str, Any]]:
    """This GPU's plan records in the bundle, by plan file, each vetted by the trust rule TVM's native code
    has: a plan built by another user or on another machine is refused unless `allow_native` (TensorRT runs
    a plan's kernels on the GPU)."""
    folder = plan_dir(key)
    out = {}
    names = bundle.manifest["files"]
    for rel in sorted(r for r in names if r.startswith(folder + "/") and r.endswith(".json")):
        rec = read_record(bundle, rel)
        if not created_here(rec.get("created_by")) and not allow_native:
            raise untrusted(bundle.name, f"a TensorRT plan ({rec['plan']}) built", rec.get("created_by"),
                            "Runtime(..., allow_native=True), or build your own: "
                            "backend=TensorRtBackend(build='always')")
        out[rec["plan"]] = rec
    return out


def stored_plan(bundle: Bundle, records: dict[str, dict[str, Any]], rel: str, key: dict[str, str],
                graph_sha: str, weights_sha: str | None) -> tuple[bytes | None, dict[str, Any], str | None]:
    """(plan bytes, its record, None), or (None, {}, why not): no plan, or a stale one (another GPU,
    capability or TensorRT version, another graph or other weights)."""
    rec = records.get(rel)
    why = stale_reason(rec.get("key") if rec else None, key)
    if why is None and (rec.get("graph_sha256"), rec.get("weights_sha256")) != (graph_sha, weights_sha):
        why = "plan built from another graph or other weights"
    if why is not None:
        return None, {}, why
    data = bundle.read(rel)                      # sha256-checked against the manifest
    if sha256_bytes(data) != rec["plan_sha256"]:
        raise BundleError(f"TensorRT plan {rel} does not match the sha256 its record gives; {REBUILD}")
    return data, rec, None


def store_plan(bundle: Bundle, rel: str, plan: bytes, record: dict[str, Any]) -> str:
    """Add a plan and its record to the bundle in one atomic update (a new version swapped in whole; the
    model it was built from must still be the bundle's), or say why it could not be (a packed bundle, a
    read-only folder, a re-export meanwhile): the plan then lives for this process only."""
    if bundle.path.suffix != ".efx":
        why = f"not stored: {bundle.path.name} is packed (read-only); unpack it to keep plans"
    else:
        files = {rel: plan, record_file(rel): (json.dumps(record, indent=1) + "\n").encode()}
        try:
            update_bundle(bundle.path, files, model=model_id(bundle.manifest))
            return f"stored at {rel}"
        except BundleError as e:
            why = f"not stored ({e})"
    log.warning("TensorRT plan for %s %s", record.get("graph"), why)
    return why
