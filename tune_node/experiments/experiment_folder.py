"""What an experiment folder holds: which kind of experiment, and who runs it now.

An experiment is the folder ``<storage>/<name>``. When tune-node starts one it writes a
*record* there (:data:`GRID_FILE` for a grid, :data:`ADAPT_FILE` for an adaptation: what
the experiment was started with); Ray Tune writes its own state beside it
(``tuner.pkl``, ``experiment_state-*.json``, one folder per trial). :func:`experiment_kind`
tells the kinds apart.

A run holds the folder's *lock* (:class:`ExperimentLock`, ``fcntl.flock`` on
:data:`LOCK_FILE` in the folder) from before Ray starts to its end, so a second run on
the same folder, new or ``--resume``, is refused at once, naming the holder. The kernel
drops a flock when its holder exits, however it exits, so a killed run never leaves a
stale lock. :func:`open_new` and :func:`open_existing` give an :class:`ExperimentFolder`:
a folder this run holds, checked to be fit for what the run is about to do.

Inside a trial's checkpoint folder, :data:`CHECKPOINT_FILE` holds the model and, once the
trial has finished, :data:`FINAL_FILE` its final numbers (read by :mod:`tune_node.results`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "GRID_FILE", "ADAPT_FILE", "SEARCH_FILE", "LOCK_FILE", "RECORD_FILES", "CLIS", "experiment_kind", "describe_contents", "check_name",
    "ExperimentFolderError", "ExperimentBusy", "ExperimentLock", "ExperimentFolder", "open_new", "open_existing",
    "read_record", "open_folders", "running_holder", "check_new", "check_existing", "CHECKPOINT_FILE",
    "FINAL_FILE",
]

GRID_FILE = "grid.json"
ADAPT_FILE = "adapt.json"
SEARCH_FILE = "search.json"
LOCK_FILE = ".tune_node.lock"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"
#: The record file of each kind of experiment tune-node starts.
RECORD_FILES = {"grid": GRID_FILE, "adaptation": ADAPT_FILE, "search": SEARCH_FILE}
#: The CLI that starts and resumes each kind.
CLIS = {"grid": "tune_node.grid", "adaptation": "tune_node.adapt", "search": "tune_node.search"}
# Files Ray Tune writes at the top of an experiment folder.
_RAY_PATTERNS = ("tuner.pkl", "trainable.pkl", "experiment_state*.json", "basic-variant-state*.json",
                 "search_gen_state*.json", ".validate_storage_marker")
_ARTICLE = {"grid": "a grid", "adaptation": "an adaptation", "search": "a critical-step search"}


class ExperimentFolderError(ValueError):
    """An experiment folder a run cannot use as asked; the message names the folder, what it holds and what to do."""


class ExperimentBusy(ExperimentFolderError):
    """The folder's lock is held by another run. ``holder``: what that run wrote into the lock (pid, host,
    started, command), or None when it could not be read."""

    def __init__(self, folder: Path, holder: dict | None):
        self.folder, self.holder = Path(folder), holder
        super().__init__(f"experiment folder {self.folder} is in use by another run ({_format_holder(holder)}); "
                         f"one folder takes one run at a time, new or --resume: wait for that run to end or stop it, "
                         f"or pick another --name")


def _entries(path: Path) -> list[str]:
    """The folder's entries that count as content: all but the lock file."""
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)


def experiment_kind(path: str | Path) -> str | None:
    """Which kind of experiment the folder ``path`` holds, from its record files.

    Returns ``"grid"`` (a :data:`GRID_FILE`, no :data:`ADAPT_FILE`), ``"adaptation"``
    (the other way round), ``None`` for an absent folder, a path that is not a folder,
    or a folder empty but for the lock file, and ``"unknown"`` for any other folder:
    Ray Tune files without a record (an experiment tune-node did not start, or one from
    before records), both records, or other files. Reads names only, never contents.
    """
    path = Path(path)
    if not path.is_dir() or not _entries(path):
        return None
    kinds = [kind for kind, record in RECORD_FILES.items() if (path / record).exists()]
    return kinds[0] if len(kinds) == 1 else "unknown"


def _ray_files(path: Path) -> list[str]:
    return sorted({p.name for pattern in _RAY_PATTERNS for p in path.glob(pattern)})


def describe_contents(path: str | Path) -> str:
    """What the folder holds, in words for a message: ``"a grid experiment"``, ``"Ray Tune files (tuner.pkl)
    but no grid.json or adapt.json"``, ``"3 entries (a, b, c)"``, ``"nothing"``."""
    path = Path(path)
    kind = experiment_kind(path)
    if kind is None:
        return "nothing"
    if kind in _ARTICLE:
        return f"{_ARTICLE[kind]} experiment"
    entries = _entries(path)
    records = [r for r in RECORD_FILES.values() if r in entries]
    if len(records) > 1:
        return f"both {' and '.join(records)} (records of two kinds of experiment)"
    ray = _ray_files(path)
    if ray:
        return f"Ray Tune files ({', '.join(ray[:3])}) but no {GRID_FILE} or {ADAPT_FILE}"
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'} ({shown})"


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be an experiment name (None if it can): it must be one folder
    directly inside the storage folder, so no path separator, not ``.`` or ``..``, not empty."""
    separators = [s for s in (os.sep, os.altsep) if s]
    if name in ("", ".", "..") or "\0" in name or any(s in name for s in separators):
        return (f"--name {name!r} is not an experiment name: it names a folder directly inside --storage, so no "
                f"{' or '.join(map(repr, separators))}, not '.' or '..', not empty; put the path into --storage instead")
    return None


def _format_holder(holder: dict | None) -> str:
    if not holder:
        return "holder not recorded"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}, "
            f"running: {holder.get('command')}")


def _read_holder(path: Path, wait: float = 1.0) -> dict | None:
    # A holder writes its record right after taking the lock: give it a moment.
    deadline = time.monotonic() + wait
    while True:
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


class ExperimentLock:
    """The exclusive lock of one experiment folder, held by this process until :meth:`release`.

    ``fcntl.flock`` on the folder's :data:`LOCK_FILE`: the kernel releases it when the
    holder's process ends, however it ends. While held, the file holds the holder's
    pid, host, start time and command line (JSON), for the refusal of other runs; an
    unheld lock file is empty (or stale, after a killed holder: never shown, since only a
    refused run reads it). ``created``: whether this lock created the file.
    """

    def __init__(self, folder: Path, fd: int, created: bool):
        self.folder, self.path, self.created = Path(folder), Path(folder) / LOCK_FILE, created
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: str | Path, command: str | None = None) -> "ExperimentLock":
        """Take the lock of the existing folder ``folder`` without waiting.

        Raises :class:`ExperimentBusy` when another run (or another lock object of this
        process) holds it, and OSError when the lock file cannot be created or opened
        (the folder is missing, read-only, ...).
        """
        folder = Path(folder)
        path = folder / LOCK_FILE
        while True:
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:  # removed in between by a run cleaning up: try again
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ExperimentBusy(folder, _read_holder(path)) from None
                raise
            # A run that cleans up unlinks the lock file while holding it; a lock taken on the
            # unlinked file would lock nothing, so it counts only if the path is still this file.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            if not folder.is_dir():
                raise FileNotFoundError(errno.ENOENT, "experiment folder removed while taking its lock", str(folder))
        lock = cls(folder, fd, created)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "command": command or " ".join([Path(sys.executable).name, *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, unlink: bool = False) -> None:
        """Give the lock up (idempotent); ``unlink``: also remove the lock file, while still holding it."""
        if self._fd is None:
            return
        try:
            if unlink:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            else:
                os.ftruncate(self._fd, 0)  # an unheld lock names no holder
        except OSError:
            pass  # the folder may be gone or read-only by now; the lock goes with the descriptor anyway
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "ExperimentLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_record(folder: str | Path, kind: str) -> dict:
    """The record of the ``kind`` experiment in ``folder``: a JSON object with a ``trials`` list.

    Raises :class:`ExperimentFolderError` naming the file when it is missing, unreadable,
    truncated or not such an object (the experiment then cannot be resumed).
    """
    path = Path(folder) / RECORD_FILES[kind]
    fix = (f"the experiment cannot be resumed; start it again under another --name (or remove {Path(folder)} "
           f"and start it again)")
    try:
        text = path.read_text()
    except OSError as err:
        raise ExperimentFolderError(f"cannot read {path}: {err.strerror or err}; {fix}") from None
    try:
        record = json.loads(text)
    except ValueError as err:
        what = "is empty" if not text.strip() else f"is truncated or not valid JSON ({err})"
        raise ExperimentFolderError(f"{path} {what}; {fix}") from None
    # An Optuna study (a search record with "study") samples its trials: its list is empty.
    study = isinstance(record, dict) and kind == "search" and isinstance(record.get("study"), dict)
    if not (isinstance(record, dict) and isinstance(record.get("trials"), list) and (record["trials"] or study)
            and all(isinstance(t, dict) for t in record["trials"])):
        raise ExperimentFolderError(f"{path} is not a tune-node {kind} record (a JSON object with a non-empty "
                                    f"'trials' list of trial configs); {fix}")
    return record


_OPEN: list["ExperimentFolder"] = []


def open_folders() -> list["ExperimentFolder"]:
    """The experiment folders this process holds now (for a CLI to close what it opened)."""
    return list(_OPEN)


@dataclass(eq=False)
class ExperimentFolder:
    """An experiment folder this run holds the lock of.

    Attributes:
        path: ``<storage>/<name>``.
        kind: ``"grid"`` or ``"adaptation"``.
        new: a new experiment (the folder was absent or empty); else a ``--resume``.
        lock: the held :class:`ExperimentLock`.
        created: folders this run created (the experiment folder, missing parents), deepest first.
        recorded: the record is written (new experiments: see :meth:`write_record`).
        started: the run went past its checks (:meth:`mark_started`); a lock file this
            run created is then kept.
    """

    path: Path
    kind: str
    new: bool
    lock: ExperimentLock
    created: list[Path] = field(default_factory=list)
    recorded: bool = False
    started: bool = False

    def write_record(self, record: dict) -> Path:
        """Write the new experiment's record, atomically (a crash leaves none or all of it); returns its path."""
        path = self.path / RECORD_FILES[self.kind]
        tmp = self.path / f".{path.name}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        self.recorded = self.started = True
        return path

    def mark_started(self) -> None:
        self.started = True

    def abandon(self) -> None:
        """Remove what this run made of a new experiment whose record is not written, so that
        no half-made folder blocks the name, then release the lock."""
        if not self.lock.held:
            return
        if self.path in self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.is_dir():
            # The folder was empty when this run took it: whatever is in it now is this run's.
            for entry in self.path.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        self.lock.release(unlink=True)
        for folder in self.created[1:] if self.path in self.created else self.created:
            try:
                folder.rmdir()  # only if empty: another run may have put something there meanwhile
            except OSError:
                break

    def close(self) -> None:
        """End this run's hold (idempotent): abandon a new experiment without a record, remove a
        lock file this run created but never used, release the lock."""
        if self in _OPEN:
            _OPEN.remove(self)
        if self.new and not self.recorded:
            self.abandon()
        else:
            self.lock.release(unlink=self.lock.created and not self.started)


def running_holder(folder: str | Path) -> dict | None:
    """The holder record of the run holding ``folder``'s lock now (``{}`` when unreadable), or None
    when no run holds it. Probes with a shared lock for an instant, writing nothing."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_holder(Path(folder) / LOCK_FILE) or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _refuse_new(path: Path, kind: str, storage: Path, name: str) -> ExperimentFolderError:
    held = experiment_kind(path)
    holder = running_holder(path)
    what = describe_contents(path) + ("" if holder is None else f", in use by another run ({_format_holder(holder)})")
    if held == kind:
        resume = "add --resume to continue it" if holder is None else "wait for that run to end and add --resume to continue it"
        return ExperimentFolderError(f"experiment {name!r} already exists in {storage} ({path} holds {what}); "
                                     f"{resume}, or pick another --name")
    if held in CLIS:
        return ExperimentFolderError(f"{path} holds {what}, not {_ARTICLE[kind]} experiment: a new {kind} experiment "
                                     f"starts only in an absent or empty folder; pick another --name (to continue that "
                                     f"experiment: python -m {CLIS[held]} --storage {storage} --name {name} --resume)")
    return ExperimentFolderError(f"{path} holds {what}: a new {kind} experiment starts only in an absent or empty "
                                 f"folder; pick another --name or --storage, or empty that folder")


def _check_folder_path(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ExperimentFolderError(f"{path} is a file, not a folder: an experiment is a folder <storage>/<name>; "
                                    f"pick another --name or --storage")


def storage_problem(storage: str | Path) -> str | None:
    """Why ``storage`` cannot hold experiments, or None: a URI pyarrow cannot open or reach
    (:func:`tune_node.experiments.storage.open_storage`; a folder path always can)."""
    from .storage import StorageError, is_uri, open_storage

    if not is_uri(storage):
        return None
    try:
        open_storage(storage)
    except StorageError as err:
        return str(err)
    return None


def _checked_path(storage, name: str) -> tuple[str, Path]:
    """``(storage as messages name it, the experiment folder on this machine)`` once the name is a plain
    folder name and the path no file. ``storage``: a folder, or a :class:`~tune_node.experiments.storage.Storage`
    (a URI's: its local copy holds the folder, messages name the URI)."""
    from .storage import Storage

    problem = check_name(name)
    if problem:
        raise ExperimentFolderError(problem)
    if isinstance(storage, Storage):
        shown, local = shlex.quote(storage.text), storage.local
    else:
        problem = storage_problem(storage)
        if problem:
            raise ExperimentFolderError(problem)
        shown, local = str(storage), Path(storage)
    path = local / name
    _check_folder_path(path)
    return shown, path


def check_new(storage, name: str, kind: str) -> Path:
    """The read-only checks of :func:`open_new` (for a dry run): returns the folder path, or raises
    :class:`ExperimentFolderError`."""
    storage, path = _checked_path(storage, name)
    if path.is_dir() and _entries(path):
        raise _refuse_new(path, kind, storage, name)
    return path


def open_new(storage, name: str, kind: str, command: str | None = None) -> ExperimentFolder:
    """Create (or take, when absent or empty) the folder of a new ``kind`` experiment and hold its lock.

    Raises :class:`ExperimentFolderError` (:class:`ExperimentBusy` for a held lock)
    naming the folder when the name is not a plain folder name, the folder holds
    anything (an experiment of either kind, Ray files, other files), or it or its lock
    cannot be created (the OS error said). Creates nothing when it raises.
    """
    path = check_new(storage, name, kind)
    storage = _checked_path(storage, name)[0]
    for attempt in range(3):
        created = []
        for folder in (path, *path.parents):
            if folder.exists() or folder.is_symlink():
                break
            created.append(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExperimentFolderError(f"cannot create the experiment folder {path}: {err.strerror or err} "
                                        f"({err.filename or path}); --storage {storage} must be a writable folder "
                                        f"(or one that can be created)") from None
        try:
            lock = ExperimentLock.acquire(path, command)
            break
        except FileNotFoundError:  # another run removed the folder meanwhile: start over
            continue
        except ExperimentBusy:
            raise
        except OSError as err:
            _remove_created(created)
            raise ExperimentFolderError(f"cannot create the lock file {path / LOCK_FILE}: {err.strerror or err}; "
                                        f"--storage {storage} must be writable") from None
    else:
        raise ExperimentFolderError(f"{path} keeps disappearing while this run takes it; another run is cleaning it up")
    # Under the lock: another run may have started here since the first look.
    if _entries(path):
        lock.release(unlink=lock.created)
        raise _refuse_new(path, kind, storage, name)
    held = ExperimentFolder(path, kind, new=True, lock=lock, created=created)
    _OPEN.append(held)
    return held


def _remove_created(created: list[Path]) -> None:
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def check_existing(storage, name: str, kind: str) -> tuple[Path, dict]:
    """The read-only checks of :func:`open_existing` (for a dry run): ``(folder path, record)``."""
    storage, path = _checked_path(storage, name)
    held = experiment_kind(path)
    if held is None:
        raise ExperimentFolderError(f"nothing to resume: no experiment {name!r} in {storage} ({path} is "
                                    f"{'empty' if path.is_dir() else 'absent'}); start it without --resume")
    if held != kind:
        what = describe_contents(path)
        if held in CLIS:
            raise ExperimentFolderError(f"{path} holds {what}, not {_ARTICLE[kind]} experiment; resume it with "
                                        f"python -m {CLIS[held]} --storage {storage} --name {name} --resume")
        raise ExperimentFolderError(f"nothing to resume as {_ARTICLE[kind]} experiment: {path} holds {what} "
                                    f"(no {RECORD_FILES[kind]}, which tune-node writes when it starts an experiment)")
    return path, read_record(path, kind)


def open_existing(storage, name: str, kind: str, command: str | None = None) -> tuple[ExperimentFolder, dict]:
    """Hold the lock of the existing ``kind`` experiment ``<storage>/<name>`` for a ``--resume``;
    returns it and its record (:func:`read_record`).

    Raises :class:`ExperimentFolderError` naming the folder and what it holds when there
    is nothing to resume, the folder holds an experiment of the other kind (with the
    command that resumes it) or Ray files without a record, the record is unreadable,
    or the lock is held (:class:`ExperimentBusy`) or cannot be created. Changes nothing
    in the folder when it raises.
    """
    path, _ = check_existing(storage, name, kind)
    try:
        lock = ExperimentLock.acquire(path, command)
    except ExperimentBusy:
        raise
    except OSError as err:
        raise ExperimentFolderError(f"cannot create the lock file {path / LOCK_FILE}: {err.strerror or err}; "
                                    f"resuming needs a writable experiment folder") from None
    held = ExperimentFolder(path, kind, new=False, lock=lock)
    _OPEN.append(held)
    try:
        _, record = check_existing(storage, name, kind)  # again, now that no other run can change it
    except BaseException:
        held.close()
        raise
    return held, record
