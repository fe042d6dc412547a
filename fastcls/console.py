"""What fastcls shows on the console. Library code logs through the "fastcls" logger hierarchy
(`logging.getLogger(__name__)`); this module decides where those records go.

- A library user (`fastcls.train` from Python) sees fastcls's INFO lines on stdout by default, as the CLI shows
  them, through `DEFAULT`: a handler on the "fastcls" logger that steps aside once the application configures
  logging (a handler on the root logger), which then receives fastcls's records like any library's.
  `logging.getLogger("fastcls").setLevel(logging.WARNING)` silences the lines, and the progress bar with them.
- `fastcls` commands own the console (`command_console`): plain message lines on stdout whatever the root logger
  holds, INFO and up, or WARNING and up under --quiet.
- Under torchrun only rank 0 shows INFO lines; every rank shows its warnings.
"""
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER = logging.getLogger("fastcls")


def interactive(stream) -> bool:
    """Whether `stream` shows a live progress bar: a terminal, or a Jupyter kernel's output (tqdm.auto draws a
    widget there). A file, a pipe or a CI log gets plain lines instead."""
    return bool(getattr(stream, "isatty", lambda: False)()) or type(stream).__module__.startswith("ipykernel")


class ConsoleHandler(logging.Handler):
    """Each record's message as one line on the current sys.stdout, through tqdm.write so that a progress bar
    drawn there is redrawn below it instead of broken. `only_unconfigured`: emit only while the root logger has
    no handler (the library default)."""

    def __init__(self, only_unconfigured: bool = False):
        super().__init__()
        self.only_unconfigured = only_unconfigured

    def filter(self, record: logging.LogRecord) -> bool:
        if self.only_unconfigured and logging.getLogger().handlers:
            return False
        if record.levelno < logging.WARNING and os.environ.get("RANK", "0") != "0":
            return False  # torchrun: rank 0 speaks for all
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


DEFAULT = ConsoleHandler(only_unconfigured=True)


def install_default() -> None:
    """The library default (at `import fastcls`), unless the application already set the logger up."""
    if not LOGGER.handlers and LOGGER.level == logging.NOTSET:
        LOGGER.addHandler(DEFAULT)
        LOGGER.setLevel(logging.INFO)


@contextmanager
def command_console(quiet: bool = False) -> Iterator[None]:
    """A command's console for its duration (then the logger as it was: cli.main may be called in-process)."""
    saved = LOGGER.level, LOGGER.propagate, list(LOGGER.handlers)
    for handler in saved[2]:
        LOGGER.removeHandler(handler)
    LOGGER.addHandler(ConsoleHandler())
    LOGGER.setLevel(logging.WARNING if quiet else logging.INFO)
    LOGGER.propagate = False
    try:
        yield
    finally:
        for handler in list(LOGGER.handlers):
            LOGGER.removeHandler(handler)
        for handler in saved[2]:
            LOGGER.addHandler(handler)
        LOGGER.setLevel(saved[0])
        LOGGER.propagate = saved[1]
