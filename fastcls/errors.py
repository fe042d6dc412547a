"""Errors that are the user's to fix: the CLI prints them in one line instead of a traceback."""


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say); what was already written stays."""


# DataError and ModelLoadError derive from ValueError. FASTCLS_DEBUG=1 shows the traceback instead.
USER_ERRORS = (ValueError, FileNotFoundError, TrainingError)
