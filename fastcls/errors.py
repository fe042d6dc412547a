"""fastcls's errors. `UserError` and its subclasses are the user's to fix (a bad flag, file, setting or model
folder): the CLI prints their message in one line and exits with code 2. Any other exception is a bug in
fastcls and shows its traceback (FASTCLS_DEBUG=1 shows one for user errors too).

They derive from ValueError so that code catching ValueError around fastcls keeps working; the CLI catches
`UserError` only, so a ValueError raised by a bug is never mistaken for bad input.
"""


class UserError(ValueError):
    """Bad input; the message names the flag, setting, file or line at fault."""


class ConfigError(UserError):
    """A setting (flag, config-file key or API argument) with a bad value."""


class DataError(UserError):
    """A data file or label set that cannot be used; the message names the file and, where known, the line."""


class ModelLoadError(UserError):
    """A model folder that cannot be loaded: missing, incomplete, or not matching its config."""


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say); what was already written stays."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a finished step, whose resumable checkpoint was written first. Not
    a UserError: the CLI prints the message in one line and exits with 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int, step: int, checkpoint, run_dir):
        import signal

        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; resumable checkpoint in "
                         f"{checkpoint}; continue with: fastcls train --resume {run_dir}")
