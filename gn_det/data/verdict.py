"""A check's verdict computed once and shared: cached on disk under a key of what it depends on, and computed by
one process of a distributed run for all of them.

:func:`cached` keeps a passed check's result in ``<cache>/checks/<hash of the key>.json`` (``<cache>``:
``$GN_DET_CACHE`` or ``~/.cache/gn_det``), written through a temporary file and a rename; a failed check is
never cached, so its error is always the check's own. :func:`shared` runs a check in process 0 of a
distributed run (detectron2's ``launch``) and hands its result, or its error, to every process.
"""
import hashlib
import json
import logging
import os

from detectron2.utils import comm

from gn_det.errors import InputError
from gn_det.fileio import write_json_atomically

from .shapes import cache_root

logger = logging.getLogger(__name__)

VERDICT_VERSION = 1  # bump when what a cached verdict means changes: older entries are then never read


def verdict_dir():
    """Where verdicts are cached: ``<cache>/checks``."""
    return os.path.join(cache_root(), "checks")


def verdict_path(key):
    digest = hashlib.sha256(json.dumps([VERDICT_VERSION, key], sort_keys=True).encode()).hexdigest()
    return os.path.join(verdict_dir(), f"{digest[:40]}.json")


def read_verdict(key):
    """The result cached under ``key``, or None (none cached, another key's file, unreadable)."""
    try:
        with open(verdict_path(key)) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("version") != VERDICT_VERSION or entry.get("key") != key:
        return None
    return entry.get("result")


def write_verdict(key, result):
    """Cache ``result`` under ``key`` (atomically: a temporary file renamed into place); a cache that cannot be
    written costs the next start the check, nothing else."""
    path = verdict_path(key)
    try:
        write_json_atomically(path, {"version": VERDICT_VERSION, "key": key, "result": result}, indent=None)
    except (OSError, InputError) as err:  # InputError: a full disk
        logger.debug("Could not cache a check's verdict in %s: %s", path, err)


def cached(key, check, still_valid=lambda result: True):
    """``check()``'s result, read from the cache when ``key`` (a JSON-able value naming what the result depends
    on) was checked before and ``still_valid(result)``; else computed, and cached when ``check`` says so.

    ``check()`` returns ``(result, cacheable)``; it raises for a failed check, which is not cached.
    """
    result = read_verdict(key)
    if result is not None and still_valid(result):
        return result
    result, cacheable = check()
    if cacheable:
        write_verdict(key, result)
    return result


def shared(check, what):
    """``check()`` in process 0 of a distributed run, its result returned in every process; in one process,
    just ``check()``.

    Every process must call this at the same point. An InputError of process 0 is raised in every process
    with its message; any other error of process 0 is raised there as it is, and in the others as a
    RuntimeError naming ``what``.
    """
    if comm.get_world_size() == 1:
        return check()
    verdict = error = None
    if comm.get_rank() == 0:
        try:
            verdict = ("ok", check())
        except InputError as err:
            verdict, error = ("input error", str(err)), err
        except Exception as err:  # noqa: BLE001 - handed to the other processes, then raised here
            verdict, error = ("failed", f"{type(err).__name__}: {err}"), err
    kind, value = comm.all_gather(verdict)[0]
    if error is not None:
        raise error
    if kind == "ok":
        return value
    if kind == "input error":
        raise InputError(value)
    raise RuntimeError(f"{what} failed in process 0: {value}")
