"""Writing files so that a reader never sees half of one, and a full disk is one line naming the file."""
import contextlib
import errno
import json
import os
import secrets
import shutil

from gn_det.errors import InputError


def no_space_error(path, needed_bytes=None):
    """The InputError for a write of ``path`` that ran out of disk space."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    needed = f", it needs about {needed_bytes / 2**20:.1f} MiB" if needed_bytes else ""
    return InputError(f"{path}: no space left on the device ({free / 2**20:.1f} MiB free{needed}); the file was not "
                      "written and the previous one, if any, is unchanged")


@contextlib.contextmanager
def atomic_paths(*paths):
    """Temporary paths beside ``paths`` for writers that take a file name: same folder and extension, one
    random part shared by all, so ``m.xml`` and ``m.bin`` get names that differ only in their extension (a
    writer that puts a ``.bin`` beside its ``.xml`` finds its partner). When the block ends without an error
    each is synced and renamed to its path in order (put the file that names the others last), else all are
    removed. A full disk is an InputError naming the last path."""
    token = secrets.token_hex(6)
    temporaries = []
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        stem, extension = os.path.splitext(name)
        temporaries.append(os.path.join(folder, f".{stem}.{token}.tmp{extension}"))
    try:
        yield temporaries
        for tmp, path in zip(temporaries, paths):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException as err:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if out_of_space(err):
            raise no_space_error(paths[-1]) from None
        raise


@contextlib.contextmanager
def staged_folder(folder):
    """A new hidden folder inside ``folder`` for a step that writes several files and can fail after writing
    the first (an export and its evaluation): when the block ends without an error its files move into
    ``folder`` (each by one rename, subfolders merged), else it is removed and ``folder`` is left as it was
    (not there, if it was not)."""
    import tempfile

    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging.", dir=folder)
    try:
        yield staging
        for root, _, files in os.walk(staging):
            target = os.path.join(folder, os.path.relpath(root, staging))
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(target, name))
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def out_of_space(err):
    """Whether ``err`` is a full disk, or was raised while handling one: torch's zip writer reports a failed
    write of the Python file it writes to as a RuntimeError of its own, the OSError as its context."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Open a temporary file beside ``path`` (:func:`atomic_paths`); when the block ends without an error it is
    synced and renamed to ``path`` (one atomic step), else removed. A full disk is an InputError naming
    ``path``."""
    with atomic_paths(path) as (tmp,), open(tmp, mode) as f:
        yield f


def save_figure(fig, path, dpi=100):
    """Save a matplotlib figure to ``path`` (format from its extension) through :func:`atomic_write`."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=dpi)


def check_output_location(path, what, folder=True):
    """Raise an InputError naming ``what`` and ``path`` when the output folder (``folder``) or file ``path``
    cannot be written: something of the other kind in the way, a file where a parent folder belongs, or a
    parent folder this process may not write. Nothing is created here."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise InputError(f"{what} {path}: a {'file' if folder else 'folder'} is in the way of the output "
                         f"{'folder' if folder else 'file'}")
    parent = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: no permission to write in {parent}")


def write_json_atomically(path, data, indent=2):
    """Write ``data`` as JSON to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=indent)


class AtomicWrites:
    """A PathManager (iopath) whose ``open`` for writing goes through :func:`atomic_write`; every other call
    is the wrapped PathManager's. Given to fvcore's Checkpointer, whose ``save`` and ``tag_last_checkpoint``
    write through ``self.path_manager.open``."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path, mode="r", **kwargs):
        if any(flag in mode for flag in "wax"):
            return atomic_write(self._path_manager.get_local_path(path), mode)
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._path_manager, name)


def read_input_file(path, what):
    """The bytes of the input file ``path``; an InputError naming ``what`` and the file when it is missing, a
    folder or unreadable. Every checked reader of a kind of file (JSON here, weights in
    :mod:`gn_det.checkpoint.reader`) starts from it."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise InputError(f"{what} {path} cannot be read ({err.strerror})") from None


def read_json(path, what="JSON file"):
    """The JSON value in ``path``; an InputError naming ``what`` and the file when it is missing, a folder,
    unreadable, not UTF-8 text or not JSON. The one reader of JSON input (datasets, runs' results, COCO files)."""
    data = read_input_file(path, what)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{what} {path} is not valid JSON: {' '.join(str(err).split())[:160]}") from None


class AtomicAppendFile:
    """A file opened for appending whose appends reach ``path`` at each ``flush`` through :func:`atomic_write`
    (the previous content plus what was appended, renamed into place), so a reader sees the file as it was
    before or after a flush, never a cut line. It has no ``fileno``: there is no open file to sync."""

    def __init__(self, path):
        self.path = path
        self._pending = []
        self._written = None  # the file's content as last written, read from disk once

    def write(self, text):
        self._pending.append(text)

    def flush(self):
        if not self._pending:
            return
        if self._written is None:
            self._written = read_input_file(self.path, "file") if os.path.isfile(self.path) else b""
        content = self._written + "".join(self._pending).encode()
        with atomic_write(self.path, "wb") as f:
            f.write(content)
        self._written, self._pending = content, []

    def close(self):
        self.flush()
