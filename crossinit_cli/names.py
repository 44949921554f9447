"""Identity names: what a valid name is, its case-insensitive key, and names that look alike on screen.

A name is also a directory name and a prompt token (`<alice>`), so it is NFKC-normalised, limited in length
and bytes, free of separators and control characters, and not one of Windows' reserved device names. Names
match case-insensitively (`name_key`), and a new name that would read like a stored one ("аlice" with a
Cyrillic "а" beside "alice", Cherokee "Ꭺlice") is refused: their Unicode TR39 skeletons (confusables) match.
Invisible characters (Default_Ignorable_Code_Point, such as U+3164 HANGUL FILLER) are refused. Nothing here
touches the file system.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

from crossinit_cli.errors import CrossinitError

MAX_NAME = 64
MAX_NAME_BYTES = 200
"""A name is also a directory name: file systems allow 255 bytes, and an entry is staged as `<key>~<32 hex>`."""
_NAME_RE = re.compile(r"^\w[\w.\-]*$")
_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): drawn as nothing, or as blank space
# that is not a space (U+3164 HANGUL FILLER is a letter to Python), so `alice\u3164` would read as `alice`.
_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)  # fmt: skip


def _ignorable(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _IGNORABLE)


@functools.lru_cache(maxsize=1)
def _prototypes() -> dict[str, str]:
    """Each character of Unicode's confusables (UTS #39 confusables.txt, as the confusable-homoglyphs package
    ships it: each pair in both directions) mapped to one member of its class: two strings have the same TR39
    skeleton exactly when their characters map to the same members. Small capitals (`ᴀ`, which the table
    leaves apart) are added as their letter."""
    from confusable_homoglyphs.confusables import confusables_data

    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    pairs = [(char, pair["c"]) for char, found in confusables_data.items() for pair in found]
    for code in (*range(0x0250, 0x02B0), *range(0x1D00, 0x1D80), *range(0xA720, 0xA800), *range(0xAB30, 0xAB70)):
        small_capital = re.fullmatch(r"LATIN LETTER SMALL CAPITAL ([A-Z])", unicodedata.name(chr(code), ""))
        if small_capital:
            pairs.append((chr(code), small_capital.group(1)))
    for one, other in pairs:
        a, b = find(one), find(other)
        if a != b:
            parent[max(a, b, key=_rank)] = min(a, b, key=_rank)
    return {char: find(char) for char in parent}


def _rank(text: str) -> tuple[bool, int, str]:
    """Which member stands for its class: a single ASCII character first, then the shortest."""
    return (not (len(text) == 1 and text.isascii()), len(text), text)


def skeleton(text: str) -> str:
    """`text`'s TR39 skeleton (characters that look alike mapped to one), case-folded: "Ꭺlice" -> "alice"."""
    table = _prototypes()
    decomposed = unicodedata.normalize("NFD", text)
    return unicodedata.normalize("NFD", "".join(table.get(c, c) for c in decomposed)).casefold()


def _skeletons(key: str) -> set[str]:
    """How a stored key can look on screen in either case (names match case-insensitively)."""
    return {skeleton(form) for form in (key, key.upper())}


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
    hidden = [c for c in name + norm if _ignorable(c)]
    if hidden:
        what = unicodedata.name(hidden[0], f"U+{ord(hidden[0]):04X}")
        raise CrossinitError(f"identity name {shown!r} contains an invisible character ({what})")
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
            other = [c for c in name if not c.isascii() and skeleton(c) != c.casefold()]
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
