"""One exception type for user-facing errors: the CLI prints its message on one line."""


class DraftOPDError(ValueError):
    """Bad input or state the user can fix; the message names the file/field/value."""
