"""Issue 29: secrets with reserved characters, bad numbers on the command line, a
``model.max_length`` the backbone cannot hold, damaged run folders in ``spt runs``,
leftovers and vague messages, wrong-length mask fields.

Every refusal is one ``error:`` line (argparse's own ``usage`` + ``error:`` for a bad
option value) with exit status 2, and leaves nothing behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import quote

import yaml
from helpers import tiny_config

from search.cli import main

MASK = "***"
PASSWORD = "p/ss@w:rd%2F"
SECRET_URL = f"postgresql://spt:{PASSWORD}@127.0.0.1:9/db"
MASKED_URL = "postgresql://spt:***@127.0.0.1:9/db"
LEAKS = (PASSWORD, quote(PASSWORD, safe=""), "p/ss", "ss@w", "w:rd", "rd%2F")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args: list[str], fragment: str) -> str:
    """Run ``spt args``: exit 2 and one ``error:`` line holding ``fragment``; returns the line."""
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    assert fragment in err[0], err[0]
    return err[0]


def assert_no_leak(files: dict[str, bytes]) -> None:
    for name, content in files.items():
        for leak in LEAKS:
            assert leak.encode() not in content, (name, leak)


# ------------------------------------------------------------------ 1. storage URL secrets


def test_a_password_with_slash_at_and_colon_stays_out_of_a_run_and_the_storage_error(tmp_path, tiny_bert, monkeypatch, capsys):
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1})
    run = tmp_path / "run"
    argv = ["spt", "run", str(config), "--out", str(run), "--quiet", "--set", f"hpo.storage={SECRET_URL}"]
    monkeypatch.setattr(sys, "argv", argv)
    assert main(argv[1:]) == 0
    capsys.readouterr()
    assert_no_leak(snapshot(run))
    assert yaml.safe_load((run / "config.yaml").read_text())["hpo"]["storage"] == MASKED_URL
    assert f"hpo.storage={MASKED_URL}" in json.loads((run / "environment.json").read_text())["command"]

    err = refused(capsys, ["hpo", str(config), "--trials", "1", "--storage", SECRET_URL, "--out", str(tmp_path / "h")],
                  f"--storage: cannot open '{MASKED_URL}' (")
    assert not any(leak in err for leak in LEAKS) and err.count(MASK) == 1, err
    assert not (tmp_path / "h").exists()


def test_the_driver_message_keeps_its_letters_when_the_password_is_one_of_them(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert)
    err = refused(capsys, ["hpo", str(config), "--trials", "1", "--storage", "postgresql://spt:p@127.0.0.1:9/db",
                           "--out", str(tmp_path / "h")], "--storage: cannot open 'postgresql://spt:***@127.0.0.1:9/db' (")
    assert err.count(MASK) == 1, err  # the URL's password only: "psycopg", "port" and "Operational" intact
    assert "spt:p@" not in err


def test_hpo_trials_and_the_exported_best_config_mask_a_password_with_reserved_characters(tmp_path, tiny_bert, monkeypatch, capsys):
    from search import hpo
    from search.storage import open_storage

    opened = []

    def sqlite_instead(url, *args):  # the study lives in SQLite; the config keeps the PostgreSQL URL
        opened.append(url)
        return open_storage(f"sqlite:///{tmp_path / 'study.db'}", *args)

    monkeypatch.setattr(hpo, "open_storage", sqlite_instead)
    config = tiny_config(tmp_path, tiny_bert, hpo={"space": {"select.k": [1, 2]}}, search={"epochs": 1})
    out, best = tmp_path / "trials", tmp_path / "best.yaml"
    argv = ["spt", "hpo", str(config), "--trials", "1", "--storage", SECRET_URL, "--study", "s", "--out", str(out),
            "--export-best", str(best), "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    assert main(argv[1:]) == 0
    streams = capsys.readouterr()
    assert opened == [SECRET_URL] and not any(leak in streams.out + streams.err for leak in LEAKS)
    assert_no_leak({**snapshot(out), "best.yaml": best.read_bytes()})
    assert yaml.safe_load((out / "trial-0000" / "config.yaml").read_text())["hpo"]["storage"] == MASKED_URL
    assert f"--storage {MASKED_URL}" in json.loads((out / "trial-0000" / "environment.json").read_text())["command"]
    assert yaml.safe_load(best.read_text())["hpo"]["storage"] == MASKED_URL


def test_storage_urls_are_parsed_not_pattern_matched(monkeypatch):
    from sqlalchemy.engine import make_url

    from search.storage import mask_password, mask_secrets, mask_url, resolve_url, storage_file

    monkeypatch.delenv("SPT_STORAGE_PASSWORD", raising=False)
    assert make_url(resolve_url(SECRET_URL)).password == PASSWORD  # the database gets the password as written
    assert make_url(resolve_url(f"postgresql://spt:{quote(PASSWORD, safe='')}@h/db")).password == PASSWORD  # or encoded
    assert mask_url("postgresql://spt:p@ss@db/x") == "postgresql://spt:***@db/x"  # no tail of it left
    assert mask_secrets(f"spt hpo --storage {SECRET_URL} --out x") == f"spt hpo --storage {MASKED_URL} --out x"
    assert mask_password("(psycopg.OperationalError) port 9 failed for spt:p@h", "p") == "(psycopg.OperationalError) port 9 failed for spt:***@h"
    assert mask_password(f"bad password {quote(PASSWORD, safe='')}", PASSWORD) == "bad password ***"
    for url in ("sqlite:///a.db", "sqlite:////tmp/x@y:z/a.db", "journal:/tmp/a:b@c/study.log", "postgresql://spt@db/x"):
        assert mask_url(url) == url and resolve_url(url) == url
    assert storage_file(resolve_url("journal:/tmp/a:b@c/study.log")) == Path("/tmp/a:b@c/study.log")
