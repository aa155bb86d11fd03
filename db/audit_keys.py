"""The audit trail's secrets, kept in files on the application hosts and never in the database.

Two keys live side by side in one folder: the HMAC key (`RADAI_AUDIT_KEY_FILE`, 32 random bytes
as hex) that keys every audit entry, and the Ed25519 signing key (`audit-signing.key`, PKCS#8
PEM, beside it) that signs the checkpoints; the signing key's public half is written beside them
(`audit-signing.pub`) for anyone who verifies checkpoints without holding the secrets. Both
secret files are created mode 0600 on first use. A database writer who cannot read them can
neither forge an entry nor a checkpoint. The composition root builds one `AuditKeys` and hands
it to `db.audit.configure`; this module imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger("radai.audit")

SIGNING_KEY_FILE = "audit-signing.key"
PUBLIC_KEY_FILE = "audit-signing.pub"
CHECKPOINT_FILE = "checkpoints.jsonl"


class AuditKeyError(RuntimeError):
    """A key file is missing, unreadable or malformed, or does not match the audit trail."""


def key_id_of_hmac_key(key: bytes) -> str:
    # Derived with the key itself, so the id names the key without saying anything about it.
    return hmac.new(key, b"radai-audit-key-id", hashlib.sha256).hexdigest()[:16]


def key_id_of_public_key(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class AuditKeys:
    """The HMAC key of the entries, the checkpoint signing key, and where checkpoints go."""

    hmac_key: bytes
    signing_key: Ed25519PrivateKey
    checkpoint_dir: Path | None = None

    @property
    def key_id(self) -> str:
        return key_id_of_hmac_key(self.hmac_key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    @property
    def signing_key_id(self) -> str:
        return key_id_of_public_key(self.public_key)

    @property
    def checkpoint_file(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_FILE

    @classmethod
    def load(
        cls, key_file: Path, checkpoint_dir: Path | None = None, *, create: bool = True
    ) -> AuditKeys:
        """Read the keys at `key_file` (and the signing key beside it), creating absent ones.

        With `create=False` a missing file is an `AuditKeyError` (a verifier must never invent
        a key: every keyed entry would then look forged)."""
        key_file = Path(key_file).expanduser()
        signing_file = key_file.with_name(SIGNING_KEY_FILE)
        if create:
            _create_secret(key_file, lambda: (secrets.token_hex(32) + "\n").encode())
            _create_secret(signing_file, _new_signing_key_pem)
        hmac_key = _read_hmac_key(key_file)
        signing_key = _read_signing_key(signing_file)
        public_file = key_file.with_name(PUBLIC_KEY_FILE)
        if create and not public_file.exists():
            _write_public_key(public_file, signing_key.public_key())
        if checkpoint_dir is not None:
            checkpoint_dir = Path(checkpoint_dir).expanduser()
        return cls(hmac_key=hmac_key, signing_key=signing_key, checkpoint_dir=checkpoint_dir)


def _new_signing_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _create_secret(path: Path, make: Callable[[], bytes]) -> None:
    """Create `path` (mode 0600) with fresh content unless it exists; safe against a race."""
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(make())
            fh.flush()
            os.fsync(fh.fileno())
        # A hard link never replaces an existing file: of two processes starting together, the
        # first one's key wins and the other reads it.
        try:
            os.link(tmp, path)
            log.info("created audit key %s (mode 0600)", path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_secret(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise AuditKeyError(f"audit key {path} does not exist") from None
    except OSError as exc:
        raise AuditKeyError(f"audit key {path} cannot be read: {exc.strerror}") from None
    if mode & 0o077:
        log.warning("audit key %s is readable by others (mode %o): chmod 600 it", path, mode)
    return data


def _read_hmac_key(path: Path) -> bytes:
    text = _read_secret(path).decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise AuditKeyError(f"audit key {path} does not hold 32 or more bytes as hex")
    return key


def _read_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_secret(path), password=None)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"audit signing key {path} is not an unencrypted PEM: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"audit signing key {path} is not an Ed25519 key")
    return key


def _write_public_key(path: Path, public: Ed25519PublicKey) -> None:
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_bytes(pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
