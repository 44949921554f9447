"""Identity names on their own: validation, the case-insensitive key, and look-alike refusal (no files)."""

from __future__ import annotations

import pytest

from crossinit_cli.errors import CrossinitError
from crossinit_cli.names import MAX_NAME, name_key, refuse_lookalike, validate_name


def test_a_valid_name_is_returned_normalised_and_keyed_case_insensitively() -> None:
    assert validate_name("Alice-2026.v2") == "Alice-2026.v2"
    assert validate_name("Ｚoë") == "Zoë"
    assert name_key("ÉMILE") == name_key("émile") == "émile"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        ("a" * (MAX_NAME + 1), "characters long"),
        ("a/b", "may not contain"),
        ("zero\u200bwidth", "control or invisible"),
        ("-dash", "must start with a letter or digit"),
        ("aux", "reserved on Windows"),
        ("\U00020000" * 60, "takes 240 bytes"),
    ],
)
def test_invalid_names_say_why_in_one_line(bad: str, reason: str) -> None:
    with pytest.raises(CrossinitError, match=reason) as info:
        validate_name(bad)
    assert "\n" not in str(info.value)


def test_a_name_that_reads_like_a_stored_one_is_refused_naming_it() -> None:
    with pytest.raises(CrossinitError, match=r"CYRILLIC SMALL LETTER A.*looks like the existing identity 'alice'"):
        refuse_lookalike("\u0430lice", ["bob", "alice"])
    refuse_lookalike("alice", ["alice", "bob"])  # its own key is no look-alike
    refuse_lookalike("alicia", ["alice"])
