"""The one error type for user mistakes; the CLI turns it into a one-line message and exit code 1."""

from __future__ import annotations

import re

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \) and two-byte ESC sequences, then any other C0/C1
# control character but the tab: what a terminal would act on instead of showing.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class CrossinitError(Exception):
    """A mistake the user can fix: bad input, missing model, unknown name."""


def clean(text: str) -> str:
    """`text` without terminal escape codes or control characters (newlines become spaces)."""
    return _CONTROLS.sub(" ", _ESCAPES.sub("", text)).strip()


def shown(text: str) -> str:
    """`text` that came from a file crossinit did not write (an imported file's base model, name or notes), fit
    to print: every control or invisible formatting character written as its escape (`\\x1b`, `\\n`,
    `\\u202e`), so a terminal shows it instead of acting on it (ESC]0;...BEL retitles a window, ESC[2J clears it)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def library_text(exc: BaseException | str, limit: int = 160, *, prefer: str = "") -> str:
    """What a library said, fit for one error line: the first non-empty line (or the first holding `prefer`),
    its escape codes and control characters removed, at most `limit` characters."""
    text = _ESCAPES.sub("", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    chosen = next((line for line in lines if prefer and prefer in line), lines[0])
    return clean(chosen)[:limit]
