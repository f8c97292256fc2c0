"""Errors that kfacbench reports to users as one clear line.

Every message names the file, key or value at fault and, where it helps, what to do about it. The
CLI prints ``str(error)`` without a traceback for these; anything else is a bug and keeps its
traceback.
"""


class KfacbenchError(Exception):
    """Base class for errors with a user-facing one-line message."""


class DataError(KfacbenchError):
    """A data file is missing, corrupted, truncated or has the wrong checksum."""


class SuiteError(KfacbenchError):
    """A suite file is malformed: bad type, unknown key, empty sweep, unknown workload..."""


class RunDirError(KfacbenchError):
    """A run directory's table or metadata file is missing, damaged or lacks what is needed."""
