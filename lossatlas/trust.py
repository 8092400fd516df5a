"""Which model and data specs read from a run file lossatlas may import: signatures under a per-user key.

A spec ``{"factory": "pkg.module:fn"}`` makes lossatlas import ``pkg.module`` and call ``fn``: read
from a shared run file, that is someone else's code. So a factory spec from a file is built only
when it is trusted:

- ``RunWriter`` signs each stored spec that names a factory with HMAC-SHA256 under this user's
  secret key, over the spec's canonical JSON and its role ("model" or "data"); a reader trusts a
  stored factory spec whose signature checks under the same key (files this user wrote here);
- anything else needs ``trust_factory=True`` (``--trust-factory``), or the spec passed again
  by the caller (``--model``/``--data``): a spec the caller gives is always trusted.

Registered names (``{"name": "mlp"}``), configuration-only specs (``{"hf": ...}``, ``{"timm": ...}``,
``{"torchvision": ...}``: a library's own builder, no remote code, no weights) and local data specs
(``{"tokens": ...}``, ``{"hf_dataset": ...}``, ``{"image_folder": ...}``: they name files, read as data
without pickle or remote code, lossatlas.models.local_data) never need trust.
The key is 32 random bytes in ``$LOSSATLAS_CONFIG_DIR/signing.key``, else ``$XDG_CONFIG_HOME/lossatlas/signing.key``, else
``~/.config/lossatlas/signing.key``; created on first signing (mode 0600, folder 0700), and not
used while another user owns it or anyone else may read or write it. Deleting it revokes trust in
every file signed with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

from lossatlas.errors import UserError

KEY_BYTES = 32
_DOMAIN = b"lossatlas spec signature v1\n"  # keeps these MACs apart from any other use of the key


def key_path() -> Path:
    """Where this user's signing key lives (see the module docstring for the search order)."""
    if os.environ.get("LOSSATLAS_CONFIG_DIR"):
        return Path(os.environ["LOSSATLAS_CONFIG_DIR"]) / "signing.key"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lossatlas" / "signing.key"


class KeyProblem(Exception):
    """The signing key exists but must not be used (wrong owner, loose mode, wrong size)."""


def _read_key(path: Path) -> bytes | None:
    """The key at ``path``; None if there is none; KeyProblem if it is there but not safe to use."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise KeyProblem(f"cannot read it ({err.strerror})") from None
    try:
        st = os.fstat(fd)  # of the opened file itself, so a swap after the check changes nothing
        if not stat.S_ISREG(st.st_mode):
            raise KeyProblem("it is not a regular file")
        if st.st_uid != os.geteuid():
            raise KeyProblem(f"it is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})")
        if st.st_mode & 0o077:  # readable: others can forge signatures; writable: others can swap the key
            raise KeyProblem(f"others may read or write it (mode {stat.S_IMODE(st.st_mode):04o}); "
                             f"run chmod 600 {path}")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise KeyProblem(f"it holds {len(key)} bytes, not {KEY_BYTES}; delete it to make a new one")
    return key


def _create_key(path: Path) -> None:
    """Write a new random key at ``path`` unless one is there: all or nothing, one key whoever races."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".signing.key.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if another process made its key first: theirs wins
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create, still one key whoever races
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(fd, "wb") as f:
                f.write(key)
    finally:
        os.unlink(tmp)


def signing_key(*, create: bool = False) -> bytes | None:
    """This user's key (made first if ``create``); None when there is none; KeyProblem when unusable."""
    path = key_path()
    key = _read_key(path)
    if key is None and create:
        _create_key(path)
        key = _read_key(path)
    return key


def _canonical(value: Any) -> Any:
    """A spec as stored (a dict, or JSON text of one, encoded any number of times) as the value it stands for.

    Decodes until the value is no longer JSON text, as spec parsing would, so that a factory
    cannot hide inside a doubly encoded string.
    """
    while isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            break
    return value


def names_factory(spec: Any) -> bool:
    """Whether a spec (dict or JSON string) asks for a factory to be imported."""
    spec = _canonical(spec)
    return isinstance(spec, Mapping) and "factory" in spec


def _mac(key: bytes, role: str, spec: Any) -> str:
    blob = json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, _DOMAIN + role.encode() + b"\n" + blob.encode(), hashlib.sha256).hexdigest()


def sign_specs(specs: Mapping[str, Any]) -> str:
    """JSON ``{role: signature}`` for each spec that names a factory (what ``RunWriter`` stores).

    Specs may be dicts or their JSON text. Without a usable key the specs stay unsigned, with a
    warning: the file is then trusted only with ``--trust-factory``.
    """
    todo = {role: spec for role, spec in specs.items() if names_factory(spec)}
    if not todo:
        return "{}"
    try:
        key = signing_key(create=True)
    except (KeyProblem, OSError) as err:
        problem = err if isinstance(err, KeyProblem) else f"cannot create it ({err})"
        warnings.warn(f"lossatlas: the signing key {key_path()} is not used: {problem}; the run's factory specs "
                      "are stored unsigned, so reading them will need --trust-factory", stacklevel=3)
        return "{}"
    return json.dumps({role: _mac(key, role, spec) for role, spec in todo.items()}, sort_keys=True)


class StoredSpec(dict):
    """A spec read from a file: the dict itself, plus where it came from and whether this user signed it.

    ``signed`` checks the signature against the spec's current contents, so editing the dict
    after reading also drops the trust.
    """

    def __init__(self, spec: Mapping[str, Any], *, role: str, source: str, signature: str | None = None) -> None:
        super().__init__(spec)
        self.role = role
        self.source = source
        self.signature = signature

    @property
    def factory(self) -> Any:
        """The ``"factory"`` entry (``"pkg.module:fn"``), or None when the spec names none."""
        return self.get("factory")

    @property
    def signed(self) -> bool:
        """True when the spec carries a valid signature under this user's (usable) key."""
        if not isinstance(self.signature, str):
            return False
        try:
            key = signing_key()
        except KeyProblem:
            return False
        if key is None:
            return False
        expected = _mac(key, self.role, dict(self)).encode()
        return hmac.compare_digest(expected, self.signature.encode("utf-8", "replace"))  # bytes: any text compares

    def key_problem(self) -> str | None:
        """Why this user's key cannot vouch for any file, or None."""
        try:
            signing_key()
        except KeyProblem as err:
            return f"your signing key {key_path()} is not used: {err}"
        return None


def stored_spec(raw: Any, signatures: Any, *, role: str, source: str | os.PathLike) -> Any:
    """The spec a run file holds (its attr parsed from JSON, or its text) with its origin attached.

    ``signatures`` is the file's ``spec_signatures`` attr (JSON text, or None when absent). A
    dict comes back as a :class:`StoredSpec`; None stays None; anything else is returned as
    read (building it fails on validation, before any import).
    """
    value = _canonical(raw)
    if not isinstance(value, Mapping):
        return value
    try:
        sigs = json.loads(signatures) if signatures is not None else {}
    except (TypeError, ValueError):  # a malformed attr: no signatures
        sigs = {}
    signature = sigs.get(role) if isinstance(sigs, Mapping) else None
    return StoredSpec(value, role=role, source=str(source), signature=signature)


def require_trusted(spec: Any, *, trust_factory: bool = False, hint: str = "") -> None:
    """Raise UserError unless ``spec`` may be built: the caller's own, a registered name, signed, or trusted.

    Checks only; imports nothing. ``hint`` is appended to the refusal (e.g. another flag to try).
    """
    if trust_factory or not isinstance(spec, StoredSpec) or "factory" not in spec or spec.signed:
        return
    why = spec.key_problem()
    raise UserError(
        f"{spec.source}: the stored {spec.role} spec names the factory {spec.factory!r}, which lossatlas imports "
        f"only from files you trust{f' ({why})' if why else ''}; rerun with --trust-factory if you trust this file, "
        f"or pass the spec again with --{spec.role}{hint}"
    )


__all__ = ["KeyProblem", "StoredSpec", "key_path", "names_factory", "require_trusted", "sign_specs",
           "signing_key", "stored_spec"]
