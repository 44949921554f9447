"""Issue 28, problem 11 (what to build 4): meta.toml and catalog rows mutated at random, then every library
command run on the library (in-process through the `cli` fixture): no traceback, only the documented exit
codes (0, or 1 with one line), and the entry nobody touched intact throughout."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossinit_cli.store import Identity, Library
from tests.factories import random_vectors

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.reliability

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.one_of(
    st.none(),  # the field deleted
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(scalars, st.lists(scalars, max_size=2)), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["step", "loss", "x"]), scalars, max_size=2), max_size=2),
)
meta_changes = st.lists(st.tuples(st.sampled_from([*Identity.__dataclass_fields__, "extra"]), values), max_size=3)
COLUMNS = ["stamp", "name", "damaged", "record", "summary", "likeness", "family", "record_check", "summary_check"]
row_changes = st.lists(
    st.tuples(
        st.sampled_from(["good", "bob"]),
        st.sampled_from(COLUMNS),
        st.one_of(st.none(), st.text(max_size=30), st.integers(), st.floats(), st.just('{"name": "bob"}')),
    ),
    max_size=2,
)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _toml_value(value: Any) -> bool:
    """What TOML can hold (no None inside a list or table: tomli_w refuses it)."""
    if isinstance(value, list):
        return all(v is not None and _toml_value(v) for v in value)
    if isinstance(value, dict):
        return all(v is not None and _toml_value(v) for v in value.values())
    return True


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(meta=meta_changes, rows=row_changes)
def test_mutated_metadata_never_takes_the_library_down(cli: Any, meta: list[Any], rows: list[Any]) -> None:
    import tomli_w

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        library = Library(home)
        for name, seed in (("good", 1), ("bob", 2)):
            ident = Identity(name=name, tokens=2, width=32, base_model="tiny", training={"mode": "fast", "steps": 3})
            library.add(ident, random_vectors(seed), random_vectors(seed + 9))
        assert cli("--home", home, "list").exit_code == 0  # the catalog built
        good = _digest(home / "identities" / "good")

        path = home / "identities" / "bob" / "meta.toml"
        raw = tomllib.loads(path.read_text())
        for key, value in meta:
            if value is None:
                raw.pop(key, None)
            elif _toml_value(value):
                raw[key] = value
        path.write_text(tomli_w.dumps(raw))
        db = sqlite3.connect(home / "catalog.sqlite")
        for key, column, value in rows:
            with contextlib.suppress(sqlite3.IntegrityError):  # a NOT NULL column stays as it was
                db.execute(f"UPDATE entries SET {column} = ? WHERE key = ?", (value, key))
        db.commit()
        db.close()

        out = Path(tmp) / "out"
        commands = [
            ("list",),
            ("list", "--json"),
            ("show", "bob"),
            ("show", "--json", "bob"),
            ("edit", "bob", "--note", "fuzzed"),
            ("export", "bob", "-o", out / "bob.safetensors"),
            ("export", "--all", "-o", f"{out}/", "--force"),
            ("doctor", "--json"),
            ("remove", "bob", "--yes"),
        ]
        for command in commands:
            result = cli("--home", home, *command)  # a traceback raises here (catch_exceptions=False)
            assert result.exit_code in (0, 1), (command, result.exit_code, result.stderr)
            if result.exit_code == 1 and command[0] != "doctor":
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                assert lines[-1].startswith("error:") and "Traceback" not in result.stderr, (command, result.stderr)
            shown = cli("--home", home, "show", "--json", "good")
            assert shown.exit_code == 0, (command, shown.stderr)
            assert json.loads(shown.stdout)["name"] == "good"
            assert _digest(home / "identities" / "good") == good, command
        assert (out / "good.safetensors").is_file()
        listed = cli("--home", home, "list", "--json")
        assert listed.exit_code == 0
        assert [e["name"] for e in json.loads(listed.stdout)] == ["good"]
