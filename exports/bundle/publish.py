"""Publishing a bundle directory atomically: it is written in a work directory beside the destination (same
filesystem) and renamed into place when complete; abandoned work directories of killed writers are removed. Single
files are written through :mod:`peftx.fsutil`."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from peftx.errors import OutputError
from peftx.fsutil import write_text_atomic

from .format import METADATA_FILE


def _check_destination(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not force:
        raise OutputError(f"{out_dir} already exists", "pass --force to replace it, or choose another --output")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).exists():
        # force replaces bundles, never an arbitrary non-empty directory someone pointed us at by mistake
        raise OutputError(
            f"{out_dir} exists and is not a peftx bundle; refusing to replace it",
            "remove it yourself or choose another path",
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (EPERM): alive
        return True
    return True


def remove_stale_workdirs(out_dir: Path) -> list[Path]:
    """Delete ``.<name>.pid<N>.*.partial`` siblings of ``out_dir`` left by a writer that was killed (SIGKILL, power
    loss): its PID no longer exists. A live PID, even a recycled one, keeps its directory (the safe side)."""
    removed = []
    for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.pid*.partial"):
        pid = p.name[len(out_dir.name) + 5 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _make_workdir(out_dir: Path) -> Path:
    """A temporary directory beside ``out_dir``, so the final rename stays on one filesystem. Its name carries our
    PID so a later run can tell an abandoned one (see :func:`remove_stale_workdirs`)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_workdirs(out_dir)
        work = Path(
            tempfile.mkdtemp(prefix=f".{out_dir.name}.pid{os.getpid()}.", suffix=".partial", dir=out_dir.parent)
        )
    except OSError as exc:
        raise OutputError(f"cannot create a directory in {out_dir.parent}: {exc}", "check permissions") from exc
    work.chmod(0o755)  # mkdtemp makes it 0700; a bundle is meant to be shared
    return work


def _move_into_place(work: Path, out_dir: Path, force: bool) -> None:
    """Rename ``work`` to ``out_dir``; an existing one (force) is moved aside first and deleted only afterwards."""
    if not out_dir.exists():
        os.rename(work, out_dir)
        return
    if not force:  # it appeared while we worked
        raise OutputError(f"{out_dir} appeared while the bundle was being written", "pass force=True to replace it")
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    os.rename(work, out_dir)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_text(path: Path, text: str, *, executable: bool = False) -> None:
    path.write_text(text, encoding="utf-8")
    if executable:
        path.chmod(0o755)
