"""Packed bundles (.efz), deltas (.efzd), signatures, and hostile packs (issue 24).

Round trips for the FITS and SN-Net bundles, a Runtime on a pack against one on the directory, deltas for an
added profile and a retrained stitch, signatures accepted and refused, and hand-built hostile packs: each
refused in one line naming the member, nothing left on disk.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import zstandard

import edgeflex as ef
from edgeflex.cli import main
from edgeflex.runtime import pack
from edgeflex.runtime.bundle import model_id, update_bundle, write_bundle
from edgeflex.runtime.pack import MANIFEST, Pack, assemble, from_planes, onnx_float_tensors, to_planes
from edgeflex.runtime.sign import generate_key, key_id, load_trusted, sign_path


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _pack(bundle: Path, out: Path, **kw) -> Path:
    with ef.Bundle.open(bundle) as b:
        return pack.pack_bundle(b, out, **kw)


@pytest.fixture(scope="module")
def sn(snnet_bundle) -> Path:
    return snnet_bundle[1]


@pytest.fixture(scope="module")
def fits_efz(fits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack(fits_bundle, tmp_path_factory.mktemp("packs") / "fits.efz")


@pytest.fixture(scope="module")
def sn_efz(sn: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack(sn, tmp_path_factory.mktemp("packs") / "sn.efz")


# --- the format ---------------------------------------------------------------------------------------------

def test_byte_planes_round_trip_every_float32_bit_pattern_class(rng: np.random.Generator) -> None:
    for n in (1, 7, 1001):
        x = rng.standard_normal(n).astype(np.float32)
        x[: min(n, 4)] = np.array([np.nan, -np.inf, -0.0, 1e-45], np.float32)[: min(n, 4)]
        planes = to_planes(x.tobytes())
        assert [len(p) for p in planes] == [n] * 4
        assert from_planes(planes) == x.tobytes()
    # the first plane is the exponent: the sign bit went to the bottom of the last one
    one, minus_one = (np.array([v], np.float32).tobytes() for v in (1.0, -1.0))
    assert to_planes(one)[0] == to_planes(minus_one)[0] == bytes([127])
    assert to_planes(one)[3] == b"\x00" and to_planes(minus_one)[3] == b"\x01"


def test_the_onnx_walker_finds_exactly_the_float_initializers(fits_bundle: Path) -> None:
    import onnx
    from onnx import numpy_helper

    data = (fits_bundle / "graphs/main.onnx").read_bytes()
    found = sorted(data[s:e] for s, e in onnx_float_tensors(data))
    model = onnx.load_from_string(data)
    want = sorted(numpy_helper.to_array(t).astype("<f4").tobytes() for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT)
    assert found == want and found
    assert onnx_float_tensors(b"\xff" * 10) == []          # not protobuf: nothing, no error


@pytest.mark.parametrize("which", ["fits", "snnet"])
def test_a_pack_round_trips_to_the_same_bundle_bytes(which: str, fits_bundle: Path, sn: Path,
                                                     tmp_path: Path) -> None:
    src = fits_bundle if which == "fits" else sn
    efz = _pack(src, tmp_path / "b.efz")
    assert efz.read_bytes()[:8] == pack.MAGIC
    assert main(["unpack", str(efz), "--out", str(tmp_path / "u.efx")]) == 0
    assert _files(tmp_path / "u.efx") == _files(src)
    size = sum(map(len, _files(src).values()))
    assert efz.stat().st_size < size
    if which == "snnet":                       # its float weights went in as byte planes
        codecs = {s["codec"] for m in Pack.open(efz).index.values() for s in m["segments"]}
        assert "planes" in codecs and efz.stat().st_size < 0.85 * size


def test_runtime_on_a_pack_runs_as_on_the_directory(fits_bundle: Path, sn: Path, fits_efz: Path,
                                                    sn_efz: Path, rng: np.random.Generator) -> None:
    for src, efz, shape in ((fits_bundle, fits_efz, (2, 24, 3)), (sn, sn_efz, (2, 3, 32, 32))):
        a, b = ef.Runtime(src, threads=1), ef.Runtime(efz, threads=1)
        assert a.configs == b.configs and b.bundle.path == efz
        x = rng.standard_normal(shape).astype(np.float32)
        for c in a.configs:
            a.switch(c.name)
            b.switch(c.name)
            np.testing.assert_array_equal(a.run(x), b.run(x))
        assert model_id(a.bundle.manifest) == model_id(b.bundle.manifest)
        # after the runtime let go of its in-memory copy, a read goes back to the pack (same version only)
        rel = sorted(b.bundle.manifest["files"])[0]
        assert b.bundle.read(rel) == a.bundle.read(rel)


def test_a_pack_is_written_atomically_and_only_over_a_pack(fits_bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "x.efz"
    other.write_bytes(b"not a pack")
    with pytest.raises(ef.BundleError, match="not an edgeflex pack: refusing"):
        _pack(fits_bundle, other, force=True)
    assert other.read_bytes() == b"not a pack"
    out = _pack(fits_bundle, tmp_path / "f.efz")
    with pytest.raises(ef.BundleError, match="already exists; pass --force"):
        _pack(fits_bundle, out)
    _pack(fits_bundle, out, force=True)
    with pytest.raises(ef.BundleError, match="must end in .efz"):
        _pack(fits_bundle, tmp_path / "f.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.efz", "x.efz"]      # no temp file left


# --- deltas -------------------------------------------------------------------------------------------------

def _delta_round_trip(old: Path, new: Path, tmp: Path) -> tuple[int, int]:
    """(delta bytes, full pack bytes) of `new` against `old`; the applied delta equals a full pack."""
    base = _pack(old, tmp / "old.efz")
    full = _pack(new, tmp / "full.efz")
    assert main(["pack", str(new), "--base", str(base), "--out", str(tmp / "d.efzd")]) == 0
    assert main(["apply", str(base), str(tmp / "d.efzd"), "--out", str(tmp / "new.efz")]) == 0
    rebuilt, want = ef.Bundle.open(tmp / "new.efz"), ef.Bundle.open(full)
    assert rebuilt.manifest == want.manifest
    assert {r: rebuilt.read(r) for r in rebuilt.manifest["files"]} == {r: want.read(r)
                                                                        for r in want.manifest["files"]}
    assert (tmp / "new.efz").read_bytes() == full.read_bytes()     # the very same file, as it happens
    inline = pack.open_delta(base, tmp / "d.efzd")                 # or in memory, for a Runtime
    assert inline.manifest == want.manifest and ef.Runtime(inline, threads=1).configs == ef.Runtime(
        full, threads=1).configs
    return (tmp / "d.efzd").stat().st_size, full.stat().st_size


def test_a_delta_for_an_added_profile_is_small_and_rebuilds_exactly(sn: Path, tmp_path: Path) -> None:
    new = tmp_path / "new.efx"
    shutil.copytree(sn, new)
    with ef.Bundle.open(new) as b:
        stats = {c.name: {"p50_ms": 1.0 + i, "p90_ms": 1.5 + i} for i, c in enumerate(b.configs)}
    profile = {"format": 1, "device": "host", "configs": stats}
    update_bundle(new, {"profiles/host.json": json.dumps(profile).encode()})
    delta, full = _delta_round_trip(sn, new, tmp_path)
    assert delta < 24 << 10 and delta < full / 50


def test_a_delta_for_a_retrained_stitch_ships_that_layer_only(sn: Path, tmp_path: Path) -> None:
    with ef.Bundle.open(sn) as b:
        manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "manifest_sha256", "format",
                                                                      "format_version")}
        files = {r: b.read(r) for r in b.manifest["files"]}
        stitch = next(s for n, s in b.segments.items() if n.startswith("stitch."))
        t = b.tensor_index[next(iter(stitch.tensors.values()))]
    weights = bytearray(files[t["file"]])
    w = np.frombuffer(weights, np.float32, t["bytes"] // 4, t["offset"]).copy()
    weights[t["offset"]:t["offset"] + t["bytes"]] = (w * 1.01 + 0.001).astype(np.float32).tobytes()
    files[t["file"]] = bytes(weights)
    write_bundle(tmp_path / "new.efx", manifest, files)
    delta, full = _delta_round_trip(sn, tmp_path / "new.efx", tmp_path)
    assert delta < t["bytes"] + (24 << 10) and delta < full / 20


def test_a_delta_needs_its_own_base(fits_bundle: Path, sn: Path, tmp_path: Path) -> None:
    _pack(sn, tmp_path / "sn.efz")
    _pack(fits_bundle, tmp_path / "other.efz")
    pack.pack_bundle(ef.Bundle.open(sn), tmp_path / "d.efzd", base=tmp_path / "sn.efz")
    with pytest.raises(ef.BundleError, match="made against another base"):
        pack.apply_delta(tmp_path / "other.efz", tmp_path / "d.efzd")
    with pytest.raises(ef.BundleError, match="must end in .efzd"):
        pack.pack_bundle(ef.Bundle.open(sn), tmp_path / "d.efz", base=tmp_path / "sn.efz")
    with pytest.raises(ef.BundleError, match="is a delta: apply it"):
        pack.open_pack(tmp_path / "d.efzd")
    assert main(["apply", str(tmp_path / "d.efzd"), str(tmp_path / "d.efzd"), "--out",
                 str(tmp_path / "n.efz")]) == 2


# --- signatures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    a, b = generate_key(d / "a"), generate_key(d / "b")
    assert oct(a[0].stat().st_mode & 0o777) == "0o600"
    return a[0], a[1], b[0], b[1]


def test_a_signed_bundle_and_pack_run_only_with_a_trusted_key(copy: Path, fits_bundle: Path, keys,
                                                              tmp_path: Path) -> None:
    a_key, a_pub, _, b_pub = keys
    before = model_id(ef.Bundle.open(copy).manifest)
    with pytest.raises(ef.BundleError, match="is not signed"):
        ef.Runtime(copy, trusted_keys=[a_pub])
    assert main(["sign", str(copy), "--key", str(a_key)]) == 0
    assert model_id(ef.Bundle.open(copy).manifest) == before          # signing is not a re-export
    efz = _pack(copy, tmp_path / "s.efz")
    for path in (copy, efz):
        rt = ef.Runtime(path, trusted_keys=[a_pub])
        assert rt.signed_by == key_id(load_trusted([a_pub])[0])
        with pytest.raises(ef.BundleError, match="none of them trusted here") as e:
            ef.Runtime(path, trusted_keys=[b_pub])
        assert "\n" not in str(e.value)
        assert ef.Runtime(path).signed_by is None                     # nothing asked: nothing checked
    # a pack signed after packing
    plain = _pack(fits_bundle, tmp_path / "p.efz")
    sign_path(plain, a_key)
    assert ef.Runtime(plain, trusted_keys=[a_pub.read_bytes()]).signed_by


def test_keygen_sign_and_trusted_key_on_the_command_line(fits_efz: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    efz = tmp_path / "f.efz"
    shutil.copy(fits_efz, efz)
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 2            # never over a key
    assert main(["info", str(efz), "--trusted-key", str(tmp_path / "k.pub.pem")]) == 2
    assert "is not signed" in capsys.readouterr().err
    assert main(["sign", str(efz), "--key", str(tmp_path / "k.pem")]) == 0
    assert main(["info", str(efz), "--trusted-key", str(tmp_path / "k.pub.pem")]) == 0
    assert main(["sign", str(efz), "--key", str(tmp_path / "k.pub.pem")]) == 2     # a public key
    assert "not an unencrypted PEM private key" in capsys.readouterr().err


def test_a_manifest_changed_after_signing_is_refused(copy: Path, keys) -> None:
    from edgeflex.runtime.schema import seal_manifest

    a_key, a_pub, _, _ = keys
    sign_path(copy, a_key)
    m = json.loads((copy / MANIFEST).read_text())
    m["configs"][0]["quality"] = {"metric": "mse", "value": 0.0}          # a better-looking model, resealed
    (copy / MANIFEST).write_text(json.dumps(seal_manifest(m), indent=1))
    with pytest.raises(ef.BundleError, match="does not match the manifest: modified after signing"):
        ef.Runtime(copy, trusted_keys=[a_pub])


def test_the_board_keys_file_applies_to_every_runtime(copy: Path, keys, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    a_key, a_pub, _, b_pub = keys
    board = tmp_path / "trusted_keys.pem"
    board.write_bytes(b_pub.read_bytes() + a_pub.read_bytes())
    monkeypatch.setenv("EDGEFLEX_TRUSTED_KEYS", str(board))
    with pytest.raises(ef.BundleError, match="is not signed"):
        ef.Runtime(copy)
    assert main(["info", str(copy)]) == 2
    sign_path(copy, a_key)
    assert ef.Runtime(copy).signed_by
    board.write_bytes(b_pub.read_bytes())
    with pytest.raises(ef.BundleError, match="none of them trusted"):
        ef.Runtime(copy)


# --- hostile packs ------------------------------------------------------------------------------------------

def _parts(efz: Path) -> tuple[bytes, dict]:
    """(header + data, index) of a pack, to be edited and put back together with `assemble`."""
    p = Pack.open(efz)
    index = {"format": "edgeflex-pack", "version": pack.PACK_VERSION, "kind": p.kind,
             "members": [json.loads(json.dumps(m)) for m in p.index.values()]}
    return p.data[:p.data_end], index


def _member(index: dict, name: str) -> dict:
    return next(m for m in index["members"] if m["name"] == name)


def _refused(data: bytes, tmp: Path, match: str) -> str:
    """`data` written as a pack is refused in one line matching `match` by open and by unpack, which
    leaves nothing behind."""
    bad = tmp / "bad.efz"
    bad.write_bytes(data)
    with pytest.raises(ef.BundleError, match=match) as e:
        ef.Bundle.open(bad)
    assert "\n" not in str(e.value)
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(ef.BundleError, match=match):
        pack.unpack(bad, out / "u.efx")
    assert list(out.iterdir()) == []
    return str(e.value)


def _graph(index: dict) -> dict:
    return next(m for m in index["members"] if m["name"] != MANIFEST)


@pytest.mark.parametrize("name", ["../evil.onnx", "/tmp/pack-evil.onnx", "graphs/../../evil", "a\\b",
                                  "graphs/./main.onnx", "", "graphs/"])
def test_member_names_that_escape_the_bundle_are_refused(fits_efz: Path, tmp_path: Path, name: str) -> None:
    body, index = _parts(fits_efz)
    _graph(index)["name"] = name
    assert "escape" in _refused(assemble(body, index), tmp_path, "not a plain relative path")
    assert not Path("/tmp/pack-evil.onnx").exists()


def test_a_link_member_and_a_duplicate_and_a_file_under_a_file_are_refused(fits_efz: Path,
                                                                          tmp_path: Path) -> None:
    body, index = _parts(fits_efz)
    index["members"].append({"name": "graphs/link.onnx", "type": "symlink", "target": "/etc/passwd"})
    _refused(assemble(body, index), tmp_path, "member 'graphs/link.onnx' is an index entry of kind 'symlink'")
    body, index = _parts(fits_efz)
    index["members"].append(dict(_graph(index)))
    _refused(assemble(body, index), tmp_path, "member 'graphs/main.onnx' appears twice")
    body, index = _parts(fits_efz)
    index["members"].append({**_graph(index), "name": "graphs/main.onnx/x"})
    _refused(assemble(body, index), tmp_path, "lies inside member 'graphs/main.onnx'")


def test_sizes_that_lie_are_refused_naming_the_member(fits_efz: Path, tmp_path: Path) -> None:
    body, index = _parts(fits_efz)
    m = _graph(index)
    m["bytes"] += 1
    m["segments"][-1]["bytes"] += 1
    _refused(assemble(body, index), tmp_path, r"member 'graphs/main.onnx' declares \d+ bytes, the manifest "
                                              "says")
    body, index = _parts(fits_efz)
    m = _graph(index)
    m["bytes"] += 1
    _refused(assemble(body, index), tmp_path, r"member 'graphs/main.onnx': its segments hold")
    body, index = _parts(fits_efz)
    m = _graph(index)
    m["bytes"] -= 1
    m["segments"][-1]["bytes"] -= 1
    _refused(assemble(body, index), tmp_path, r"member 'graphs/main.onnx' declares \d+ bytes, the manifest "
                                              "says")
    body, index = _parts(fits_efz)      # fewer bytes than its frame holds: within the bound, still refused
    m = _member(index, MANIFEST)
    m["bytes"] -= 1
    m["segments"][-1]["bytes"] -= 1
    _refused(assemble(body, index), tmp_path, r"member 'manifest.json': compressed data claims \d+ bytes, "
                                              r"expected \d+: a lying size")


def _bomb_frame(n: int) -> bytes:
    """zstd of `n` zero bytes written streaming, so the frame does not say how large it is."""
    c = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(n >> 20)) + c.flush()


def test_a_decompression_bomb_is_stopped_while_decompressing(fits_efz: Path, tmp_path: Path) -> None:
    body, index = _parts(fits_efz)
    seg = _graph(index)["segments"][0]
    frame = _bomb_frame(1 << 30)                # 1 GiB of zeros in ~40 KiB
    seg["parts"] = [[len(body), len(frame)]]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(assemble(body + frame, index), tmp_path, "member 'graphs/main.onnx'.*decompression bomb")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10     # KiB: < 256 MiB
    # a frame that says it is huge is refused before any byte is decompressed
    big = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
    seg["parts"] = [[len(body), len(big)]]
    _refused(assemble(body + big, index), tmp_path, "claims 67108864 bytes")
    # a manifest that declares more than the reader allows: refused before anything is decompressed
    with pytest.raises(ef.BundleError, match="over the 1000 allowed"):
        Pack.open(fits_efz).members(limit=1000)


def test_truncation_anywhere_is_one_line_naming_what_broke(fits_efz: Path, tmp_path: Path) -> None:
    data = fits_efz.read_bytes()
    bad = tmp_path / "t.efz"
    for cut in [*range(0, 64), *range(64, len(data), max(1, len(data) // 300)), len(data) - 1]:
        bad.write_bytes(data[:cut])
        with pytest.raises(ef.BundleError) as e:
            ef.Bundle.open(bad)
        assert "\n" not in str(e.value) and "t.efz" in str(e.value)
    body, index = _parts(fits_efz)      # a frame cut short inside an intact pack names the member
    seg = _graph(index)["segments"][0]
    seg["parts"][0][1] -= 3
    _refused(assemble(body, index), tmp_path, "member 'graphs/main.onnx'.*does not decompress")


def test_a_changed_missing_or_unlisted_member_is_refused(fits_efz: Path, tmp_path: Path) -> None:
    body, index = _parts(fits_efz)
    m = _graph(index)
    other = zstandard.ZstdCompressor().compress(bytes(m["segments"][0]["bytes"]))
    m["segments"][0]["parts"] = [[len(body), len(other)]]
    _refused(assemble(body + other, index), tmp_path, "member 'graphs/main.onnx' fails its sha256 check")
    body, index = _parts(fits_efz)
    index["members"].remove(_graph(index))
    _refused(assemble(body, index), tmp_path, "member 'graphs/main.onnx' is missing")
    body, index = _parts(fits_efz)
    index["members"].append({**_graph(index), "name": "graphs/extra.onnx"})
    _refused(assemble(body, index), tmp_path, "member 'graphs/extra.onnx' is not listed in the manifest")
    body, index = _parts(fits_efz)
    _graph(index)["segments"][0]["parts"][0][0] = len(body) + 10       # past the data
    _refused(assemble(body, index), tmp_path, "outside the pack's data")


def test_an_existing_bundle_is_not_replaced_by_a_failed_unpack(fits_efz: Path, fits_bundle: Path,
                                                               tmp_path: Path) -> None:
    dest = tmp_path / "u.efx"
    shutil.copytree(fits_bundle, dest)
    before = _files(dest)
    body, index = _parts(fits_efz)
    _graph(index)["segments"][0]["parts"][0][1] -= 1
    bad = tmp_path / "bad.efz"
    bad.write_bytes(assemble(body, index))
    assert main(["unpack", str(bad), "--out", str(dest), "--force"]) == 2
    assert _files(dest) == before and sorted(os.listdir(tmp_path)) == ["bad.efz", "u.efx"]
