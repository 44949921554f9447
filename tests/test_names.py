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
        ("alice\u3164", "invisible character \\(HANGUL FILLER\\)"),  # a letter to Python, drawn as nothing
        ("\u3164", "invisible character"),
        ("\uffa0bob", "invisible character"),  # HALFWIDTH HANGUL FILLER (NFKC: U+3164)
        ("bob\u115f", "invisible character"),  # HANGUL CHOSEONG FILLER
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


@pytest.mark.parametrize(
    ("lookalike", "letter"),
    [
        ("\u13aalice", "CHEROKEE LETTER GO"),  # Ꭺlice
        ("\ua4eelice", "LISU LETTER A"),  # ꓮlice
        ("\u1d00lice", "LATIN LETTER SMALL CAPITAL A"),  # ᴀlice
        ("\u0430lice", "CYRILLIC SMALL LETTER A"),
        ("al\u0131ce", "LATIN SMALL LETTER DOTLESS I"),
        ("\U0001d41alice", None),  # MATHEMATICAL BOLD SMALL A: NFKC makes it "alice", the same identity
    ],
)
def test_names_whose_tr39_skeleton_is_a_stored_ones_are_refused(lookalike: str, letter: str | None) -> None:
    """UTS #39 confusables, not a hand list: scripts the old list lacked (Cherokee, Lisu, small capitals)."""
    if letter is None:
        assert name_key(lookalike) == "alice"
        return
    with pytest.raises(CrossinitError, match=rf"\({letter}\) looks like the existing identity 'alice'"):
        refuse_lookalike(lookalike, ["bob", "alice"])


def test_names_that_merely_share_letters_with_a_stored_one_are_fine() -> None:
    for name in ("alicia", "alice2", "\u0431\u043e\u0440\u0438\u0441", "\u5c71\u7530", "Zo\u00eb", "malice"):
        refuse_lookalike(name, ["alice", "bob"])
