"""Ed25519 signatures over a bundle's manifest (which lists every file's sha256), for bundles and packs.

A signature is kept in the manifest itself, under `signatures` (a list of `{"key": KEY_ID, "ed25519":
BASE64}`), and signs the manifest's canonical JSON without its seal and its signatures, after a domain
prefix. Keys are PEM files (openssl's too); the trusted public keys come from `Runtime(trusted_keys=)` and
a board-wide keys file. `cryptography` is imported only here, only when a key is read or a signature made
or checked; writing a signed manifest into a bundle or a pack is `bundle.update_bundle`'s / `pack.py`'s.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgeflex.errors import BundleError, UsageError

from .schema import SEAL
from .store import FORMAT

SIGNATURES = "signatures"
DOMAIN = b"edgeflex-manifest-signature-v1\n"
# The board-wide keys file (PEM public keys, concatenated): when it exists, every Runtime needs a signature
# by one of its keys. `EDGEFLEX_TRUSTED_KEYS` names another file.
BOARD_KEYS = "/etc/edgeflex/trusted_keys.pem"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise BundleError("signatures need the cryptography package, which is not installed: "
                          "pip install 'edgeflex[sign]'") from None
    return serialization, ed25519


def signed_bytes(manifest: dict[str, Any]) -> bytes:
    """What a signature signs: the domain prefix and the manifest's canonical JSON without seal and
    signatures (so the files' sha256s, configs, everything a reader uses)."""
    body = {k: v for k, v in manifest.items() if k not in (SEAL, SIGNATURES)}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key: Any) -> str:
    """A public key's name in a signature: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(out: str | os.PathLike) -> tuple[Path, Path]:
    """A new Ed25519 key pair: `OUT.pem` (private, PKCS8, mode 0600; never leaves the workstation) and
    `OUT.pub.pem` (public: what boards trust). Refuses to overwrite either."""
    serialization, ed25519 = _crypto()
    priv = ed25519.Ed25519PrivateKey.generate()
    base = str(out).removesuffix(".pem")
    kpath, ppath = Path(base + ".pem"), Path(base + ".pub.pem")
    for p in (kpath, ppath):
        if os.path.lexists(p):
            raise UsageError(f"{str(p)!r} exists: refusing to overwrite a key; choose another name")
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    ppath.write_bytes(priv.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return kpath, ppath


def load_private_key(path: str | os.PathLike) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise UsageError(f"key {str(path)!r} is not an unencrypted PEM private key ({e}); make one with "
                         "`edgeflex keygen --out NAME`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"key {str(path)!r} is a {type(key).__name__}, expected an Ed25519 key "
                         "(`edgeflex keygen` or `openssl genpkey -algorithm ed25519`)")
    return key


def sign_manifest(manifest: dict[str, Any], key: Any) -> dict[str, Any]:
    """`manifest` with a signature by `key` (an Ed25519 private key) added; one by the same key replaced.
    The caller seals and writes it."""
    kid = key_id(key.public_key())
    sig = base64.b64encode(key.sign(signed_bytes(manifest))).decode()
    others = [s for s in manifest.get(SIGNATURES, []) if isinstance(s, dict) and s.get("key") != kid]
    return {**manifest, SIGNATURES: [*others, {"key": kid, "ed25519": sig}]}


def _pem_blocks(data: bytes, where: str) -> list[Any]:
    serialization, ed25519 = _crypto()
    keys, marker = [], b"-----END PUBLIC KEY-----"
    for chunk in data.split(marker)[:-1]:
        try:
            key = serialization.load_pem_public_key(chunk + marker)
        except ValueError as e:
            raise UsageError(f"trusted key in {where} is not a PEM public key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise UsageError(f"trusted key in {where} is a {type(key).__name__}, expected Ed25519")
        keys.append(key)
    if not keys:
        raise UsageError(f"{where} holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
    return keys


def load_trusted(keys: list[Any] | None) -> list[Any]:
    """The public keys to trust: each of `keys` (a PEM file path, PEM bytes, or an Ed25519PublicKey) and
    those of the board-wide keys file when it exists. Empty: no signature is asked for."""
    if isinstance(keys, (str, bytes, os.PathLike)):
        keys = [keys]
    out = []
    board = os.environ.get("EDGEFLEX_TRUSTED_KEYS", BOARD_KEYS)
    if board and os.path.exists(board):
        out += _pem_blocks(Path(board).read_bytes(), f"board keys file {board!r}")
    for k in keys or []:
        if isinstance(k, (str, os.PathLike)):
            try:
                out += _pem_blocks(Path(k).read_bytes(), f"{str(k)!r}")
            except OSError as e:
                raise UsageError(f"trusted key {str(k)!r} cannot be read: {e.strerror}") from None
        elif isinstance(k, bytes):
            out += _pem_blocks(k, "trusted_keys")
        elif type(k).__name__.startswith("Ed25519PublicKey") or hasattr(k, "verify"):
            out.append(k)
        else:
            raise UsageError(f"trusted_keys holds a {type(k).__name__}; expected a PEM file path, PEM bytes "
                             "or an Ed25519PublicKey")
    return out


def verify(manifest: dict[str, Any], trusted: list[Any], where: str) -> str:
    """Check that one of `trusted` signed `manifest`; returns the key id. One-line BundleError otherwise."""
    from cryptography.exceptions import InvalidSignature

    sigs = manifest.get(SIGNATURES)
    if not sigs:
        raise BundleError(f"{where} is not signed, and this runtime trusts only signed bundles: sign it with "
                          "`edgeflex sign PATH --key KEY.pem`")
    if not isinstance(sigs, list) or not all(isinstance(s, dict) for s in sigs):
        raise BundleError(f"{where}: manifest signatures are malformed; sign it again")
    by_id = {key_id(k): k for k in trusted}
    message = signed_bytes(manifest)
    named = []
    for s in sigs:
        kid = s.get("key")
        named.append(str(kid)[:16])
        if kid not in by_id:
            continue
        try:
            by_id[kid].verify(base64.b64decode(str(s.get("ed25519")), validate=True), message)
        except (InvalidSignature, ValueError):
            raise BundleError(f"{where}: its signature by trusted key {kid} does not match the manifest: "
                              "modified after signing, or forged; refusing it") from None
        return kid
    raise BundleError(f"{where} is signed by key(s) {', '.join(named)}, none of them trusted here "
                      f"(trusted: {', '.join(by_id) or 'none'}); refusing it")


def check_trust(bundle: Any, trusted_keys: list[Any] | None) -> str | None:
    """For `Runtime`: when any key is trusted (`trusted_keys` or the board's keys file), the bundle must
    be signed by one of them. Returns the signing key's id, or None when nothing is asked."""
    trusted = load_trusted(trusted_keys)
    if not trusted:
        return None
    return verify(bundle.manifest, trusted, f"bundle {str(bundle.path)!r}")


def sign_path(path: str | os.PathLike, key_path: str | os.PathLike) -> str:
    """Sign the bundle directory or `.efz` pack at `path` in place (a new version, written atomically;
    the files stay as they are). Returns the key id."""
    from .bundle import FORMAT_VERSION, Bundle, _manifest_bytes, update_bundle
    from .pack import PACK_SUFFIX, encode, pack_target, write_file

    key = load_private_key(key_path)
    if Path(path).suffix != PACK_SUFFIX:
        def edit(m: dict[str, Any]) -> dict[str, Any]:     # update_bundle adds the format keys: sign them
            head = {"format": FORMAT, "format_version": FORMAT_VERSION}
            return {k: v for k, v in sign_manifest({**head, **m}, key).items() if k not in head}

        update_bundle(path, {}, edit=edit)
        return key_id(key.public_key())
    dest = pack_target(path, PACK_SUFFIX, force=True)
    b = Bundle.open(dest)
    manifest = sign_manifest(b.manifest, key)
    files = {"manifest.json": _manifest_bytes(manifest)}
    files.update((rel, b.read(rel)) for rel in sorted(b.manifest["files"]))
    write_file(dest, encode(files, manifest), PACK_SUFFIX, force=True)
    return key_id(key.public_key())
