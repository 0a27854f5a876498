"""User errors: mistakes in what the user gave (a config value, a file, a dataset folder), as opposed to bugs.

``csfrn.cli.main`` prints a :class:`UserError` as one line, ``csfrn <verb>: error: <message>``, and exits with
status 2 (``--debug`` shows the traceback); any other exception is a bug and keeps its traceback. Each type also
derives from the built-in exception that Python code would expect (``ValueError``, ``KeyError``,
``FileNotFoundError``, ``OSError``), so library callers can keep catching those.

A user error raised inside a DataLoader worker comes back to the main process re-created from the worker's
formatted traceback (``torch.utils.data`` re-raises ``type(err)(text)``); the constructor recognises that text and
keeps only the original message, so the user still gets one line (the worker's traceback stays in
``worker_traceback``).
"""


class UserError(Exception):
    """Base class: the message says what is wrong, which file or config key, and what was expected."""

    worker_traceback = None

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and " in DataLoader worker process " in args[0]:
            text = args[0]
            marker = f"\n{type(self).__module__}.{type(self).__qualname__}: "
            at = text.rfind(marker)
            if at >= 0:
                self.worker_traceback = text
                args = (text[at + len(marker) :].rstrip("\n"),)
        super().__init__(*args)
        self.args = args

    def __str__(self):
        # KeyError would quote the message; every user error prints as plain text.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(UserError, ValueError):
    """A config value (YAML file, --set override or checkpoint config) that is malformed or out of range."""


class UsageError(UserError, ValueError):
    """A command-line argument that is malformed, out of range or not taken by the command."""


class ConfigKeyError(UserError, KeyError):
    """A config key that does not exist."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the user named (or that a dataset layout requires) does not exist."""


class DataError(UserError, ValueError):
    """Dataset contents that break the dataset's contract (label values, sizes, empty splits)."""


class OutputExistsError(UserError, FileExistsError):
    """An output the command would replace, which the user did not ask to replace."""


class UnreadableFileError(UserError, OSError):
    """A file that exists but cannot be read as what it should be (corrupt image, wrong label mode)."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the iteration, the loss terms and what to try."""


class MissingDependencyError(UserError, ImportError):
    """An optional package that the config or the command needs is not installed; the message says how to get it."""


class RunLockedError(UserError, BlockingIOError):
    """The work_dir is in use by another run (its lock file names the process, host and start time)."""


class ResumeMismatchError(UserError, ValueError):
    """Under torchrun, a rank whose checkpoint to resume from is missing or differs from the one rank 0 chose."""


class DistributedTimeoutError(UserError, TimeoutError):
    """A process stopped answering the others for longer than ``train.dist_timeout``."""


class OutputNotWritableError(UserError, PermissionError):
    """An output folder or file that cannot be written (read-only, a file where a folder is meant, ...)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM: ``signum`` says which; the CLI prints ``str(err)`` (when not empty) as one line and
    exits with 128 + signum (130, 143)."""

    def __init__(self, signum, message=""):
        super().__init__(message)
        self.signum = signum

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class TrainingInterrupted(Interrupted):
    """A training stopped by SIGINT / SIGTERM between two steps: ``iteration`` reached, ``checkpoint`` (the
    last.pth written at it, or None) and the message saying how to continue."""

    def __init__(self, signum, message, iteration, checkpoint):
        super().__init__(signum, message)
        self.iteration, self.checkpoint = iteration, checkpoint
