"""Folders we write into: the overwrite rules and the atomic folder writer.

`check_target` decides whether an export may go to a folder. It never lets an export replace the
working directory, the home directory, a filesystem root (or a folder above any of them), a folder
that contains or lies inside the model's source or a model cache, an export in progress, or a
non-empty folder that is not an earlier export of ours (our marker file `.workbench-export`, or our
`recipe.json` + `workbench_metrics.json` pair, written by exports before the marker existed).

`atomic_folder` writes into a temporary folder beside the target, named
`.NAME.tmp-PID-START-xxxx` (PID and its start time from /proc, since process ids are reused), and
renames it into place only when everything was written. The temp folder is removed on any failure,
on SIGINT and SIGTERM (the handlers remove it, then let the signal do what it did before), and, when
the process was killed outright, by the next export into the same parent or at app start
(`sweep_remembered`: the parents are remembered in the cache). A full disk or a permission refusal
becomes one line (`WriteFailure`) naming what was not written; nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ExportError, WriteFailure
from .export_files import set_modes

log = logging.getLogger(__name__)

MARKER = ".workbench-export"
LEGACY_PAIR = ("recipe.json", "workbench_metrics.json")
PARENTS_FILE = "export-parents.txt"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+$")
_ENV_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only"}


# ---- the overwrite rules --------------------------------------------------------------------------
def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b."""
    return a == b or b in a.parents


def cache_folders() -> list[Path]:
    """Our cache and the Hugging Face home (hub cache included): never an export target."""
    from .loading import cache_dir

    hf = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    out = [cache_dir(), Path(hf)]
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    return [_real(p) for p in out]


def is_our_export(folder: Path) -> bool:
    return (folder / MARKER).is_file() or all((folder / n).is_file() for n in LEGACY_PAIR)


def check_target(path: str | os.PathLike | None, *, overwrite: bool, protect: Iterable = ()) -> Path:
    """The resolved target folder, or a WorkbenchError naming the rule that refuses it and what to do.

    `protect`: paths (the model's source folder or file) that the target may neither contain nor lie
    inside; entries that are not existing paths (an in-memory model, a hub id) are ignored."""
    if path is None or not str(path).strip():
        raise ExportError("no output folder given: name a new folder to export to")
    out = _real(str(path).strip())
    what = f"the output folder {out}"
    if out == Path(out.anchor):
        raise ExportError(f"{what} is a filesystem root: name a new folder to export to")
    for label, p in (("the working directory", Path.cwd()), ("your home directory", Path.home())):
        p = _real(p)
        if _within(p, out):
            rel = "is" if p == out else "contains"
            raise ExportError(f"{what} {rel} {label}, which an export never replaces: name a new folder")
    for p in cache_folders():
        if _within(out, p) or _within(p, out):
            raise ExportError(f"{what} {'lies inside' if _within(out, p) else 'contains'} the model cache {p}: "
                              "export somewhere else")
    for src in protect:
        if not src or not os.path.exists(Path(str(src)).expanduser()):
            continue
        p = _real(src)
        if _within(out, p) or _within(p, out):
            rel = "is" if out == p else ("lies inside" if _within(out, p) else "contains")
            raise ExportError(f"{what} {rel} the model's source {p}, which an export never touches: "
                              "name a folder outside it")
    if _TEMP.match(out.name):
        raise ExportError(f"{what} is a temporary folder of an export: name another folder")
    busy = live_temps(out)
    if busy:
        raise ExportError(f"an export into {out} is in progress (process {busy[0]}): wait for it to finish "
                          "or name another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExportError(f"{what} exists and is not a folder: name a new folder")
        if any(out.iterdir()):
            if not overwrite:
                raise ExportError(f"{out} already exists; choose another folder or ask to overwrite "
                                  "(--overwrite, or the Overwrite box)")
            if not is_our_export(out):
                raise ExportError(f"{out} is not an earlier export of the workbench (no {MARKER} marker), so "
                                  "overwrite will not replace it: empty it yourself or name another folder")
    return out


# ---- process identity -----------------------------------------------------------------------------
def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), 0 where
    /proc is absent but the process exists, None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


def _owner_alive(pid: int, start: int) -> bool:
    now = process_start(pid)
    return now is not None and (now == start or now == 0 or start == 0)


def live_temps(out: Path) -> list[int]:
    """Ids of live processes writing into `out` (their temp folder sits beside it)."""
    pids = []
    with contextlib.suppress(OSError):
        for e in out.parent.iterdir():
            m = _TEMP.match(e.name)
            if m and m["name"] == out.name and m["kind"] == "tmp" and _owner_alive(int(m["pid"]), int(m["start"])):
                pids.append(int(m["pid"]))
    return pids


# ---- stale temp folders ---------------------------------------------------------------------------
def sweep_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the temp folders in `parent` whose owning process is gone. A previous export parked as
    `.NAME.old-...` by a process killed mid-swap is put back when NAME is missing. -> paths removed."""
    parent = Path(parent)
    removed = []
    try:
        entries = sorted(parent.iterdir(), key=lambda e: 0 if ".tmp-" in e.name else 1)
    except OSError:
        return removed
    for e in entries:
        m = _TEMP.match(e.name)
        if not m or _owner_alive(int(m["pid"]), int(m["start"])):
            continue
        target = parent / m["name"]
        try:
            if m["kind"] == "old" and not target.exists():
                os.replace(e, target)
                log.warning("restored %s from an export interrupted while replacing it", target)
                continue
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
            removed.append(e)
        except OSError as err:
            log.warning("could not remove the stale temporary folder %s: %s", e, err)
    return removed


def _parents_file() -> Path:
    from .loading import cache_dir

    return cache_dir() / PARENTS_FILE


def remember_parent(parent: Path, keep: int = 200) -> None:
    """Note an export parent so the app's start can sweep it (the newest `keep` are kept)."""
    f = _parents_file()
    try:
        old = f.read_text().splitlines() if f.is_file() else []
        lines = [p for p in old if p and p != str(parent)] + [str(parent)]
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines[-keep:]) + "\n")
        os.replace(tmp, f)
    except OSError as e:  # remembering is a convenience; never fail an export over it
        log.warning("could not record %s in %s: %s", parent, f, e)


def sweep_remembered() -> list[Path]:
    """Sweep every remembered export parent (the app calls this at start). -> paths removed."""
    f = _parents_file()
    removed = []
    with contextlib.suppress(OSError):
        for line in f.read_text().splitlines():
            if line.strip() and Path(line).is_dir():
                removed += sweep_stale(line)
    return removed


# ---- signals ---------------------------------------------------------------------------------------
class _Active:
    """The temp folders this process is writing, removed by the SIGINT/SIGTERM handlers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.folders: set[Path] = set()
        self.previous: dict[int, object] = {}

    def remove_all(self) -> None:
        with self.lock:
            folders, self.folders = set(self.folders), set()
        for p in folders:
            shutil.rmtree(p, ignore_errors=True)

    def handler(self, signum, frame):
        self.remove_all()
        prev = self.previous.get(signum, signal.SIG_DFL)
        if callable(prev):
            return prev(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        if prev == signal.SIG_IGN:
            return None
        signal.signal(signum, signal.SIG_DFL)  # die of the signal, as before
        os.kill(os.getpid(), signum)
        return None


_ACTIVE = _Active()


def install_signal_cleanup() -> bool:
    """Route SIGINT and SIGTERM through the temp-folder cleanup (once; main thread only, where Python
    allows handlers). Earlier handlers still run after it. -> whether the handlers are in place."""
    if threading.current_thread() is not threading.main_thread():
        return bool(_ACTIVE.previous)
    for sig in (signal.SIGINT, signal.SIGTERM):
        cur = signal.getsignal(sig)
        if cur != _ACTIVE.handler:
            _ACTIVE.previous[sig] = cur
            signal.signal(sig, _ACTIVE.handler)
    return True


# ---- environment failures ----------------------------------------------------------------------------
def environment_failure(e: BaseException, what: str) -> WriteFailure | None:
    """A WriteFailure for a full disk or a permission refusal (OSError, or a library error that only
    carries the OS's words, as safetensors' does), else None."""
    code = getattr(e, "errno", None)
    reason = _ENV_ERRNOS.get(code)
    if reason is None:
        text = str(e).lower()
        if "no space left" in text or "os error 28" in text or "storagefull" in text:
            reason = _ENV_ERRNOS[errno.ENOSPC]
        elif "permission denied" in text or "os error 13" in text:
            reason = _ENV_ERRNOS[errno.EACCES]
    if reason is None:
        return None
    return WriteFailure(f"{what} was not written: {reason}; nothing was left behind (free some space or "
                        "choose a folder you can write to, then export again)")


@contextlib.contextmanager
def atomic_folder(target, overwrite: bool = False, progress=None, *, protect: Iterable = ()) -> Iterator[Path]:
    """Yield a new temporary folder beside `target`; when the block finishes it gets our marker and is
    renamed into place (an earlier export is replaced only with `overwrite`, and only once the new one
    is complete). On any failure or signal the temp folder is removed and the target is as it was."""
    out = check_target(target, overwrite=overwrite, protect=protect)
    parent = out.parent
    what = f"the export {out}"
    tag = f"{os.getpid()}-{process_start(os.getpid()) or 0}-{secrets.token_hex(3)}"
    tmp = parent / f".{out.name}.tmp-{tag}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(parent)
        remember_parent(parent)
        tmp.mkdir()
    except OSError as e:
        raise (environment_failure(e, what) or ExportError(f"cannot write into {parent}: {e}")) from e
    install_signal_cleanup()
    with _ACTIVE.lock:
        _ACTIVE.folders.add(tmp)
    try:
        try:
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"written_by": "compression-workbench"}) + "\n")
            set_modes(tmp)  # what libraries wrote (some through private temp files) gets the umask's modes
            if progress:
                progress(0.95, "moving into place")
            if out.exists() and any(out.iterdir()):
                old = parent / f".{out.name}.old-{tag}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if out.exists():
                    out.rmdir()  # an empty folder the person made for the export
                os.replace(tmp, out)
        except ExportError:
            raise
        except Exception as e:
            failure = environment_failure(e, what)
            if failure is None:
                raise
            raise failure from e
    finally:
        with _ACTIVE.lock:
            _ACTIVE.folders.discard(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
