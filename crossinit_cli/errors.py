"""The one error type for user mistakes; the CLI turns it into a one-line message and exit code 1."""


class CrossinitError(Exception):
    """A mistake the user can fix: bad input, missing model, unknown name."""
