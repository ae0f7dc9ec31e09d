"""Whether a run directory can be made and written, asked before anything else about a job.

Checked without creating anything (a refused job leaves no empty folder behind), from the path
alone: a file where the directory or one of its parents should be, a name longer than the file
system allows, a parent this process cannot write into. Each is bad input, one line, rather than
the traceback ``mkdir`` raises seconds later, after the configuration and corpus were checked.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


def check_run_dir(run_dir: Path) -> None:
    """Raise ``ValueError`` naming why ``run_dir`` cannot be made or written into."""
    where = f"run directory {run_dir}"
    if os.path.lexists(run_dir):
        if not os.path.isdir(run_dir):
            raise ValueError(f"{where} is a file, not a directory; choose another --run-dir")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ValueError(f"{where} cannot be written into ({_denied(run_dir)}); choose another --run-dir")
        return
    missing, probe = [], Path(os.path.abspath(run_dir))
    while not os.path.lexists(probe):
        missing.append(probe.name)
        probe = probe.parent
    if not os.path.isdir(probe):
        raise ValueError(f"{where} cannot be made: {probe} is a file, not a directory")
    limit = os.pathconf(probe, "PC_NAME_MAX")
    for name in reversed(missing):
        if len(os.fsencode(name)) > limit:
            raise ValueError(f"{where} cannot be made: {os.strerror(errno.ENAMETOOLONG)} (a name of "
                             f"{len(os.fsencode(name))} bytes; this file system allows {limit})")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{where} cannot be made: no new folder can go into {probe} ({_denied(probe)})")


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents); what the checks above could not foresee is bad input too."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"run directory {run_dir} cannot be made: {os.strerror(exc.errno or errno.EIO)}") from None


def _denied(path: Path) -> str:
    """The reason ``access`` gives: a read-only file system, or permission denied."""
    try:
        readonly = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        readonly = False
    return os.strerror(errno.EROFS if readonly else errno.EACCES)
