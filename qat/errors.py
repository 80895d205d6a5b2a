"""Typed errors: raised anywhere in qat, caught once at the entry point, printed as one line."""

import sys


class QatError(Exception):
    """Base class: a problem the user can fix; the message names the problem and the fix."""


class ConfigError(QatError):
    """A configuration value is out of range or inconsistent."""


class DataError(QatError):
    """A dataset is missing, malformed or unreachable."""


class CheckpointError(QatError):
    """A checkpoint is missing, corrupt or from a different model."""


class RunDirError(QatError):
    """The run directory cannot be used as asked (not writable, or would be overwritten)."""


class TrainingError(QatError):
    """Training diverged (NaN/Inf) or otherwise cannot continue."""


class ExportError(QatError):
    """Folding or export failed a check, or has nothing to export."""


def report_error(problem: QatError | str) -> int:
    """Print the one line a failing qat command ends with; returns its exit status, 2."""
    print(f"qat: error: {problem}", file=sys.stderr)
    return 2
