"""Publishing files and directories by rename, so a reader never sees a half-written one.

Writers build ``PATH.partial`` (a directory) or a temporary file beside ``PATH`` and publish it
with one rename. Replacing an existing directory cannot be one rename on POSIX, so it is three
steps, none of which deletes the old version before the new one is in place:

    PATH -> PATH.old ; PATH.partial -> PATH ; delete PATH.old

A crash between the first two leaves ``PATH.old`` and no ``PATH``; ``recover(PATH)`` (called
before anything reads or replaces ``PATH``) puts the old version back.
"""

import contextlib
import json
import os
import shutil
import tempfile

OLD_SUFFIX = ".old"
PARTIAL_SUFFIX = ".partial"


def check_out_not_over_input(out: str, source: str, flag: str = "--load") -> None:
    """ValueError when ``out`` is or contains ``source``: writing (or replacing) the output
    would delete its own input."""
    dst = os.path.realpath(os.path.expanduser(out)).rstrip(os.sep)
    src = os.path.realpath(os.path.expanduser(source))
    if dst == src or src.startswith(dst + os.sep):
        raise ValueError(f"--out {out} must neither be nor contain {flag} {source}: the "
                         "output would replace its own input; choose another --out")


def delete(path: str) -> None:
    """Removes the file or directory ``path`` if it exists (a symlink itself, not its target)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def recover(path: str) -> None:
    """Undoes a replacement that died midway: ``PATH.old`` without ``PATH`` becomes ``PATH``
    again; a ``PATH.old`` beside a complete ``PATH`` is the leftover of a finished one."""
    old = path.rstrip("/") + OLD_SUFFIX
    if not os.path.lexists(old):
        return
    if os.path.lexists(path):
        delete(old)
    else:
        os.replace(old, path)


def replace_dir(partial: str, path: str) -> None:
    """Publishes the complete directory ``partial`` as ``path``, keeping any old ``path`` until
    the new one is in place."""
    recover(path)
    old = path.rstrip("/") + OLD_SUFFIX
    if os.path.lexists(path):
        os.replace(path, old)
    os.replace(partial, path)
    delete(old)


def file_mode() -> int:
    """The mode ``open`` gives a new file (0o666 & ~umask): ``mkstemp`` files are 0600 and are
    chmod-ed to it before they are published. The umask can only be read by setting it."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def replacing(path: str, mode: str = "w"):
    """``with replacing(PATH) as f: f.write(...)``: a file beside ``path`` (text; ``mode="wb"``:
    binary) that replaces it by one rename when the block ends cleanly (mode 0666 & ~umask, as
    ``open`` would give) and is deleted when it raises."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and one rename (``replacing``)."""
    with replacing(path) as f:
        f.write(text)


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """A matplotlib figure saved as PNG through ``replacing``: never half-written. Returns ``path``."""
    with replacing(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def write_json(path: str, obj) -> None:
    """``write_text`` of ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_output(path: str, force: bool, flag: str = "--out") -> None:
    """ValueError, before any work, when ``path`` cannot be written as a new output: it exists
    and ``force`` is not set (nothing is overwritten silently), or the directory it goes in is
    not a writable directory. The nearest existing ancestor must be a directory that a probe
    file can be created in: ``os.access`` alone says yes to root even on a read-only mount."""
    if os.path.lexists(path) and not force:
        raise ValueError(f"{flag} {path} already exists; pass --force to replace it, or choose "
                         "another path")
    if os.path.isdir(path) and not os.path.islink(path):
        raise ValueError(f"{flag} {path} is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is not a directory; choose another path")
    try:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError("no write permission")
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e}); choose "
                         "a writable directory") from None
