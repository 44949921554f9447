"""Identity names: what a valid name is, its case-insensitive key, and names that look alike on screen.

A name is also a directory name and a prompt token (`<alice>`), so it is NFKC-normalised, limited in length
and bytes, free of separators and control characters, and not one of Windows' reserved device names. Names
match case-insensitively (`name_key`), and a new name that would read like a stored one ("аlice" with a
Cyrillic "а" beside "alice") is refused. Nothing here touches the file system.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from crossinit_cli.errors import CrossinitError

MAX_NAME = 64
MAX_NAME_BYTES = 200
"""A name is also a directory name: file systems allow 255 bytes, and an entry is staged as `<key>~<32 hex>`."""
_NAME_RE = re.compile(r"^\w[\w.\-]*$")
_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
# Letters of other scripts drawn like Latin ones (from Unicode's confusables, UTS #39), so that "аlice" with
# a Cyrillic "а" cannot sit beside, and pass for, "alice". Both cases: names match case-insensitively.
_LOOKALIKES = str.maketrans(
    dict(
        pair
        for pairs in (
            "АA ВB СC ЕE НH ІI ЈJ КK МM ОO РP ЅS ТT ХX УY "  # Cyrillic capitals
            "аa еe іi јj оo рp сc уy хx ѕs ԁd һh ӏl ԛq ԝw вb гr кk мm нh тt ьb",  # and small letters
            "ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX αa ιi κk νv οo ρp υu χx ϲc ϳj",  # Greek
            "ՕO ՍU ՏS օo սu ցg հh ոn զq",  # Armenian
            "ıi ɑa ɡg ʟL Ƅb ƅb ǀl ɩi",  # Latin letters drawn like other Latin ones
        )
        for pair in pairs.split()
    )
)


def _skeletons(key: str) -> set[str]:
    """How a stored key can look on screen, written in Latin where another script's letters look Latin."""
    return {form.translate(_LOOKALIKES).casefold() for form in (key, key.upper())}


def validate_name(name: str) -> str:
    """Return the name as stored (NFKC-normalised) or raise a one-line CrossinitError saying why not."""
    shown = name.encode("unicode_escape").decode("ascii")[:80]
    norm = unicodedata.normalize("NFKC", name)
    if not norm:
        raise CrossinitError("identity name is empty")
    if len(norm) > MAX_NAME:
        raise CrossinitError(f"identity name is {len(norm)} characters long; the limit is {MAX_NAME}")
    if any(unicodedata.category(c).startswith("C") for c in norm):
        raise CrossinitError(f"identity name {shown!r} contains control or invisible characters")
    if "/" in norm or "\\" in norm or ".." in norm:
        raise CrossinitError(f"identity name {shown!r} may not contain '/', '\\' or '..'")
    if not _NAME_RE.match(norm):
        raise CrossinitError(
            f"identity name {shown!r} must start with a letter or digit and use only letters, digits, '_', '-' and '.'"
        )
    if norm.split(".")[0].casefold() in _RESERVED or norm.endswith("."):
        raise CrossinitError(f"identity name {shown!r} is reserved on Windows (or ends with '.'); pick another")
    size = len(norm.casefold().encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise CrossinitError(f"identity name takes {size} bytes as a file name (UTF-8); the limit is {MAX_NAME_BYTES}")
    return norm


def name_key(name: str) -> str:
    """The case-insensitive key an identity is stored under."""
    return validate_name(name).casefold()


def refuse_lookalike(name: str, keys: Iterable[str]) -> None:
    """Raise if `name` would look like one of the stored `keys` on screen (its own key excepted)."""
    key = name_key(name)
    mine = _skeletons(key)
    for other_key in keys:
        if other_key != key and _skeletons(other_key) & mine:
            shown = ascii(name)  # escaped, or the message would show two identical names
            other = [c for c in name if c.translate(_LOOKALIKES) != c]
            which = f" ({unicodedata.name(other[0], '')})" if other else ""
            raise CrossinitError(
                f"identity name {shown}{which} looks like the existing identity {other_key!r}; "
                "pick a name that reads differently"
            )


def closest(name: str, keys: Iterable[str], limit: int = 3) -> list[str]:
    """The stored keys that read most like `name` (difflib), best first: for "did you mean" in errors."""
    import difflib

    wanted = unicodedata.normalize("NFKC", name).casefold()
    return difflib.get_close_matches(wanted, list(keys), n=limit, cutoff=0.6)


def did_you_mean(name: str, keys: Iterable[str]) -> str:
    """ "did you mean 'alice'?" (or "'alice' or 'alicia'"), or "" when no stored name is close."""
    found = closest(name, keys)
    if not found:
        return ""
    quoted = [repr(k) for k in found]
    return "did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
