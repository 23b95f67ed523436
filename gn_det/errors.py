"""The one exception type for bad input, and how the tools report it.

Every check of user input (config files and keys, group settings, datasets and images, weights files,
command-line values) raises :class:`InputError` with a one-line message naming the offending file, key,
layer, value or image. The tools print ``str(err)`` for it and exit non-zero (:func:`exit_on_input_error`);
every other exception is a bug or a fault of the environment and keeps its traceback.
"""
import contextlib
import sys


class InputError(ValueError):
    """Bad input, with a one-line message naming the offender (a ``ValueError``, so callers that catch
    ``ValueError`` keep working)."""


# How the last line of a Python traceback names an InputError: "gn_det.errors.InputError: <message>".
TRACEBACK_PREFIX = f"{InputError.__module__}.{InputError.__qualname__}: "


def input_error_in_traceback(text):
    """The InputError that another process raised, given the traceback text it sent back, or None.

    torch's process spawning (detectron2's ``launch``) and its DataLoader worker processes hand an exception
    of a child process to the parent as the child's formatted traceback; when the child's exception was an
    InputError (raised as such, not as a subclass), the last line carries its message.
    """
    lines = text.strip().splitlines()
    if lines and lines[-1].startswith(TRACEBACK_PREFIX):
        return InputError(lines[-1][len(TRACEBACK_PREFIX):])
    return None


def one_line(err):
    """The one line to print for an InputError; for one a DataLoader worker raised (torch re-raises it in the
    parent with the worker's traceback as its message), the worker's original message."""
    from_worker = input_error_in_traceback(str(err))
    return str(from_worker if from_worker is not None else err)


@contextlib.contextmanager
def exit_on_input_error(prog):
    """Around a tool's ``main``: an InputError exits with status 1 and ``PROG: error: MESSAGE`` on stderr."""
    try:
        yield
    except InputError as err:
        sys.exit(f"{prog}: error: {one_line(err)}")
