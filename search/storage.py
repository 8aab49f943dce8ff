"""Optuna storage URLs: passwords kept out of files and messages, and opening a storage.

* A URL's password is never printed or written: :func:`mask_secrets` turns
  ``postgresql://spt:secret@db/x`` into ``postgresql://spt:***@db/x`` in any text.
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
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>[^@\s/]*)@")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_USER_ONLY = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]+)@")
USAGE = "use sqlite:///file.db, postgresql://user@host/db or journal:/path/file.log"


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m['head']}:{MASK}@", text)


def resolve_url(url: str) -> str:
    """``url`` with ``${NAME}`` references and ``$SPT_STORAGE_PASSWORD`` filled in."""

    def variable(match: re.Match) -> str:
        if match[1] not in os.environ:
            raise UserError("--storage", f"the URL names the environment variable {match[1]}, which is not set")
        return os.environ[match[1]]

    url = _ENV_REFERENCE.sub(variable, url)
    password = os.environ.get(PASSWORD_ENV)
    masked = _CREDENTIALS.search(url)
    if masked and masked["password"] == MASK:
        if password is None:
            raise UserError("--storage", f"the URL's password is masked ({MASK}); set {PASSWORD_ENV} to the password")
        return url.replace(masked[0], f"{masked['head']}:{quote(password, safe='')}@", 1)
    if password is not None and not masked:
        return _USER_ONLY.sub(lambda m: f"{m['head']}:{quote(password, safe='')}@", url, count=1)
    return url


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
            raise UserError("--storage", f"{mask_secrets(url)!r} is not a storage URL; {USAGE}")
        return _rdb_storage(resolved, heartbeat_interval, grace_period, max_retry)
    except UserError:
        raise
    except Exception as exc:  # SQLAlchemy and drivers raise many types for an unreachable server
        raise UserError("--storage", f"cannot open {mask_secrets(url)!r} ({_describe(exc, resolved)})") from None


def _describe(exc: Exception, url: str) -> str:
    """The first line of a driver's error, with the password masked, and a hint for a missing driver."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    password = _CREDENTIALS.search(url)
    if password and password["password"]:
        text = text.replace(password["password"], MASK)
    text = f"{type(exc).__name__}: {mask_secrets(text)}"
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
