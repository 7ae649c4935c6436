"""The one exception type users see for bad input: each message says what to do."""


class AccInfError(ValueError):
    """Raised before any long work starts when an input cannot be used."""
