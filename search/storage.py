"""Optuna storage URLs: passwords kept out of files and messages, and opening a storage.

* A URL's password is never printed or written: :func:`mask_url` (SQLAlchemy's
  ``make_url``) turns ``postgresql://spt:secret@db/x`` into ``postgresql://spt:***@db/x``,
  :func:`mask_secrets` does so for every URL in a text, and a driver's message loses the
  password itself (:func:`mask_password`). A password may be written as is, ``/``, ``@``
  and ``:`` included (it runs to the URL's last ``@``), or URL-encoded.
* The password can stay out of commands and configs altogether: ``${NAME}`` in a URL is
  replaced by the environment variable ``NAME``, and a URL with a user but no password
  (or the masked ``***``) takes ``$SPT_STORAGE_PASSWORD`` when it is set.
* RDB storages (SQLite, PostgreSQL, MySQL) record a heartbeat of every running trial: a
  trial whose worker died (SIGKILL, a lost machine) is failed once its heartbeat is older
  than the grace period, and retried with the same parameters
  (``hpo.heartbeat_interval``, ``hpo.grace_period``, ``hpo.max_retry``).
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from spt.errors import UserError

PASSWORD_ENV = "SPT_STORAGE_PASSWORD"
MASK = "***"
_USER = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):")
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_ENCODED = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_USER_ONLY = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]+)@")
USAGE = "use sqlite:///file.db, postgresql://user@host/db or journal:/path/file.log"


def _credentials(url: str) -> tuple[str, str, str] | None:
    """``url`` split as ``(scheme://user, password as written, @host...)``, or None without a password.

    The password runs from the ``:`` after the user to the *last* ``@``, so a password
    written with ``/``, ``@`` or ``:`` in it is found whole (an ``@`` in a database name
    or query must be written ``%40``)."""
    match = _USER.match(url)
    if match is None:
        return None
    rest = url[match.end():]
    at = rest.rfind("@")
    return None if at < 0 else (match["head"], rest[:at], rest[at:])


def _quoted(password: str) -> str:
    """``password`` URL-encoded, unless it is written encoded already (``%40`` for ``@``)."""
    return password if _ENCODED.fullmatch(password) else quote(password, safe="")


def _normalized(url: str) -> str:
    """``url`` with its password URL-encoded, so that SQLAlchemy reads it whole."""
    parts = _credentials(url)
    return url if parts is None else f"{parts[0]}:{_quoted(parts[1])}{parts[2]}"


def mask_url(url: str) -> str:
    """A storage URL with its password shown as ``***`` (parsed by SQLAlchemy's ``make_url``)."""
    parts = _credentials(url)
    if parts is None:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(_normalized(url)).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads (a bad port, an unknown layout): mask by position
        return f"{parts[0]}:{MASK}{parts[2]}"


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``; a URL runs from
    its ``scheme://`` to the next whitespace."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+", lambda m: mask_url(m[0]), text)


def mask_argument(argument: str) -> str:
    """One command-line argument (``--storage URL`` or ``hpo.storage=URL``) with a URL's password masked."""
    match = _URL_START.search(argument)
    return argument if match is None else argument[:match.start()] + mask_url(argument[match.start():])


def password_of(url: str) -> str | None:
    """The password ``url`` gives the database (URL-decoded), if any."""
    if _credentials(url) is None:
        return None
    try:
        from sqlalchemy.engine import make_url

        return make_url(_normalized(url)).password
    except Exception:
        return _credentials(url)[1]  # type: ignore[index]


def mask_password(text: str, password: str | None) -> str:
    """``text`` (a driver's message) with ``password`` - as is and URL-encoded - replaced by
    ``***`` wherever it stands alone; other text, single letters included, is left as it is."""
    if not password:
        return text
    forms = sorted({password, quote(password, safe=""), quote(password, safe=" +")}, key=len, reverse=True)
    pattern = "|".join(re.escape(form) for form in forms)
    return re.sub(rf"(?<![A-Za-z0-9])(?:{pattern})(?![A-Za-z0-9])", MASK, text)


def _variable(name: str) -> str:
    if name not in os.environ:
        raise UserError("--storage", f"the URL names the environment variable {name}, which is not set")
    return os.environ[name]


def _fill(text: str, encode: bool) -> str:
    """``text`` with ``${NAME}`` replaced by the variable (URL-encoded where ``encode``; other
    text of a password is encoded unless written encoded)."""
    if not encode:
        return _ENV_REFERENCE.sub(lambda m: _variable(m[1]), text)
    pieces = _ENV_REFERENCE.split(text)  # text, name, text, name, ..., text
    return "".join(quote(_variable(p), safe="") if i % 2 else _quoted(p) for i, p in enumerate(pieces))


def resolve_url(url: str) -> str:
    """``url`` with ``${NAME}`` references and ``$SPT_STORAGE_PASSWORD`` filled in and its
    password URL-encoded (a password may be written with ``/``, ``@`` or ``:`` in it)."""
    password = os.environ.get(PASSWORD_ENV)
    parts = _credentials(url)
    if parts is None:
        url = _normalized(_fill(url, encode=False))  # a variable may hold the whole user:password
        if password is not None and _credentials(url) is None:
            return _USER_ONLY.sub(lambda m: f"{m['head']}:{quote(password, safe='')}@", url, count=1)
        return url
    head, written, tail = parts
    if written == MASK:
        if password is None:
            raise UserError("--storage", f"the URL's password is masked ({MASK}); set {PASSWORD_ENV} to the password")
        return f"{_fill(head, False)}:{quote(password, safe='')}{_fill(tail, False)}"
    return f"{_fill(head, False)}:{_fill(written, True)}{_fill(tail, False)}"


def storage_file(url: str) -> Path | None:
    """The local file a storage writes (SQLite database, journal), if any."""
    if url.startswith("journal:"):
        return Path(url[len("journal:") :]).expanduser()
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///") :].split("?")[0]).expanduser()
    return None


def default_storage(root: Path) -> str:
    """The SQLite study beside the trials: ``<root>/spt-hpo.db``."""
    return f"sqlite:///{root / 'spt-hpo.db'}"


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None) -> Any:
    """An Optuna storage for ``url``; an unreachable or malformed one is a :class:`UserError`
    whose message never shows the password."""
    import optuna

    resolved = resolve_url(url)
    try:
        if resolved.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = storage_file(resolved)
            assert path is not None
            if not path.parent.is_dir():
                raise UserError("--storage", f"folder {path.parent} of journal file {path.name} does not exist")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if "://" not in resolved:
            raise UserError("--storage", f"{mask_url(url)!r} is not a storage URL; {USAGE}")
        return _rdb_storage(resolved, heartbeat_interval, grace_period, max_retry)
    except UserError:
        raise
    except Exception as exc:  # SQLAlchemy and drivers raise many types for an unreachable server
        raise UserError("--storage", f"cannot open {mask_url(url)!r} ({describe_error(exc, resolved)})") from None


def describe_error(exc: Exception, url: str) -> str:
    """The first line of a driver's error, with the password masked, and a hint for a missing driver."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {mask_secrets(mask_password(text, password_of(url)))}"
    if isinstance(exc, ImportError):
        text += "; install the database driver: pip install 'psycopg[binary]>=3.1' (psycopg 3 for postgresql://; the hpo extra of spt-search)"
    return text


def retry_callback(max_retry: int | None) -> Any:
    """Optuna's callback that re-queues a dead worker's trial with the same parameters."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / deprecated in some Optuna versions
        return cls(max_retry=max_retry)


def _rdb_storage(url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None,
                 attempts: int = 6) -> Any:
    """An RDB storage with heartbeats; workers that start together on an empty database race
    to create its tables, and the losers of that race retry once the winner's tables exist."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    heartbeat: dict[str, Any] = {}
    if heartbeat_interval:
        new_api = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
        callback_name = "heartbeat_stale_trial_callback" if new_api else "failed_trial_callback"
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                     callback_name: retry_callback(max_retry)}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **heartbeat)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
