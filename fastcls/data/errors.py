"""The one exception the data layer raises for bad input files, so the CLI can report it without a traceback."""


class DataError(ValueError):
    """A data file or label set that cannot be used; the message names the file and, where known, the line."""


def at(source: str, line: int | None = None) -> str:
    """`file:line` prefix in the form editors and terminals turn into links."""
    return f"{source}:{line}" if line is not None else str(source)
