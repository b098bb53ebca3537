"""Typed, user-facing errors. Panels and the CLI turn these into one clear message.

Everything a person can cause (a bad path, an unknown architecture, a block index out of range)
raises a subclass of WorkbenchError; `assert` is kept for internal invariants only.
"""


class WorkbenchError(Exception):
    """Base class: the message is written for the person using the tool."""


class ModelLoadError(WorkbenchError):
    """The model could not be found, read or fitted into memory."""


class UnsupportedArchitecture(WorkbenchError):
    """No adapter knows this architecture, or a module the adapter needs is missing."""


class RecipeError(WorkbenchError):
    """A recipe or one of its steps is malformed (unknown op, bad field, bad value)."""


class BlockIndexError(RecipeError):
    """A block index is out of range, or an operation would remove every block."""


class DataError(WorkbenchError):
    """Calibration or evaluation text is missing or too short."""


class ExportError(WorkbenchError):
    """The export target exists (and overwrite was not asked) or could not be written."""


class WriteFailure(ExportError):
    """The environment refused a write (disk full, permission denied): the CLI exits 3, not 2."""


class Cancelled(WorkbenchError):
    """A long job was cancelled by the person; the workspace is unchanged."""
