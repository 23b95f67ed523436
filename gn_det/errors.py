"""The one exception type for bad input.

Every check of user input (config files and keys, group settings, datasets and images, weights files,
command-line values) raises :class:`InputError` with a one-line message naming the offending file, key,
layer, value or image. The tools print ``str(err)`` for it and exit non-zero; every other exception is a bug
or a fault of the environment and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input, with a one-line message naming the offender (a ``ValueError``, so callers that catch
    ``ValueError`` keep working)."""
