"""Where a data error happened, in the `file:line` form that editors and terminals turn into links."""
from fastcls.errors import DataError

__all__ = ["DataError", "at"]


def at(source: str, line: int | None = None) -> str:
    """`file:line`; for rows in memory (a source written `<name>`), `<name> row N`."""
    if line is None:
        return str(source)
    return f"{source} row {line}" if source.startswith("<") else f"{source}:{line}"
