"""Where experiments are written: a local folder, or a URI that every node of a cluster reaches.

``--storage`` takes what Ray Tune's ``storage_path`` takes: a folder path (on a multi-node
cluster, one every node mounts at the same path), or a URI such as ``s3://bucket/prefix``
that pyarrow opens (``pyarrow.fs.FileSystem.from_uri``: ``s3://``, ``gs://``, ``hdfs://``;
S3 options such as ``?endpoint_override=host:port&scheme=http`` go in the query, credentials
in the usual ``AWS_*`` environment variables).

With a URI, Ray Tune writes its state and every trial's checkpoints to the URI itself, from
whichever node runs the trial. The driver keeps a *local copy* of each experiment it runs
(:attr:`Storage.local`, under :func:`copies_folder`): it brings the experiment down from the
URI before it checks or resumes it and when the trials are done (:meth:`Storage.pull`), builds
the results tables there, and sends tune-node's own files (the experiment's record, the
tables) up to the URI (:meth:`Storage.push`). So the URI alone holds the whole experiment:
another machine resumes it or reads its results from there.

What a URI does not give: the lock that refuses a second run on one experiment is held in
the local copy, so it guards against a second run on the same machine only.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["Storage", "StorageError", "open_storage", "is_uri", "copies_folder", "split_experiment_uri", "local_experiment",
           "LOCAL_ONLY_FILES"]

#: Files of an experiment folder that stay in the local copy (the run's lock).
LOCAL_ONLY_FILES = (".tune_node.lock",)
# Ray Tune writes and uploads these itself; pushing the local copy's older versions would undo its writes.
_RAY_TOP_LEVEL = re.compile(r"^(tuner\.pkl|trainable\.pkl|experiment_state.*\.json|basic-variant-state.*\.json|"
                            r"search_gen_state.*\.json|searcher-state.*\.pkl|\.validate_storage_marker)$")


class StorageError(ValueError):
    """A ``--storage`` that cannot hold experiments; the message names it and what is allowed."""


def is_uri(storage: str | Path) -> bool:
    """Whether ``storage`` is a URI (``scheme://...``) rather than a folder path."""
    return isinstance(storage, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage) is not None


def copies_folder() -> Path:
    """Where the local copies of URI storage live: ``$TUNE_NODE_COPIES`` if set, else
    ``$XDG_CACHE_HOME/tune_node/copies`` (``~/.cache/tune_node/copies``)."""
    given = os.environ.get("TUNE_NODE_COPIES")
    if given:
        return Path(given).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser().resolve() / "tune_node" / "copies"


@dataclass(frozen=True)
class Storage:
    """The storage of experiments: each experiment ``name`` is ``<storage>/<name>``.

    Attributes:
        text: ``--storage`` as given (a URI), or the absolute folder path.
        local: the folder holding experiment folders on this machine: the storage itself for a
            path, the local copy of a URI.
        filesystem, root: for a URI, the pyarrow file system and the storage's path in it
            (``bucket/prefix``); None and the folder path for a local folder.
    """

    text: str
    local: Path
    filesystem: object | None = None
    root: str = ""

    @property
    def remote(self) -> bool:
        return self.filesystem is not None

    def where(self, name: str) -> str:
        """The experiment ``name`` as a user names it: ``s3://bucket/prefix/name`` or the folder path."""
        if not self.remote:
            return str(self.local / name)
        parts = urlsplit(self.text)
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/{name}" + (f"?{parts.query}" if parts.query else "")

    def ray_arguments(self) -> dict:
        """Ray Tune's ``RunConfig`` storage keywords for this storage."""
        if not self.remote:
            return {"storage_path": str(self.local)}
        return {"storage_path": self.root, "storage_filesystem": self.filesystem}

    def restore_arguments(self, name: str) -> dict:
        """``Tuner.restore``'s ``path`` and ``storage_filesystem`` for the experiment ``name``."""
        if not self.remote:
            return {"path": str(self.local / name)}
        return {"path": f"{self.root}/{name}", "storage_filesystem": self.filesystem}

    def pull(self, name: str) -> None:
        """Make the local copy of the experiment ``name`` equal to what the URI holds (a no-op for
        a local folder): files absent here or of another size are fetched, the experiment's top-level
        files always (small, rewritten in place), and files the URI no longer holds are removed here
        (but the lock). An experiment the URI does not hold leaves an empty (or no) local copy. A copy
        that another run on this machine holds is left as it is (that run owns it)."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        from .experiment_folder import check_name, running_holder

        problem = check_name(name)  # "..": the copy's parent, every experiment in it
        if problem:
            raise StorageError(problem)
        base = f"{self.root}/{name}"
        local = self.local / name
        holder = running_holder(local)
        if holder is not None and holder.get("pid") != os.getpid():
            return  # another run on this machine works in this copy; it refuses this run anyway
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as err:
            raise StorageError(f"cannot read {self.where(name)}: {err}") from None
        remote = {info.path[len(base) + 1:]: info for info in infos if info.type == pafs.FileType.File}
        for relative in sorted(_local_files(local)):
            if relative not in remote and relative not in LOCAL_ONLY_FILES:
                (local / relative).unlink()
        _remove_empty_folders(local)
        for relative, info in sorted(remote.items()):
            target = local / relative
            top_level = "/" not in relative
            if target.is_file() and not top_level and target.stat().st_size == info.size and not _newer(info, target):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            try:
                with self.filesystem.open_input_stream(info.path) as source, open(tmp, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
            except OSError as err:
                raise StorageError(f"cannot copy {self.where(name)}/{relative} to {target}: {err}") from None
            os.replace(tmp, target)

    def push(self, name: str) -> None:
        """Send tune-node's files of the experiment ``name`` (its record and tables: the local copy's
        top-level files that Ray Tune does not write itself, but the lock) up to the URI; a no-op for
        a local folder."""
        if not self.remote:
            return
        local = self.local / name
        if not local.is_dir():
            return
        base = f"{self.root}/{name}"
        try:
            self.filesystem.create_dir(base, recursive=True)
            for path in sorted(local.iterdir()):
                if not path.is_file() or path.name in LOCAL_ONLY_FILES or _RAY_TOP_LEVEL.match(path.name) or path.name.startswith("."):
                    continue
                with open(path, "rb") as source, self.filesystem.open_output_stream(f"{base}/{path.name}") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
        except OSError as err:
            raise StorageError(f"cannot send {local}'s tables and record up to {self.where(name)}: {err}; they are "
                               f"in {local}, and the next run on this experiment sends them again") from None


def _newer(info, target: Path) -> bool:
    """Whether the URI's file was written after the local copy's (a checkpoint rewritten at the same size)."""
    return info.mtime is not None and info.mtime.timestamp() > target.stat().st_mtime


def _local_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


def _remove_empty_folders(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:
            pass


def open_storage(storage: str | Path) -> Storage:
    """The :class:`Storage` of ``--storage``: a folder path (made absolute; it need not exist yet),
    or a URI pyarrow opens and reaches now.

    Raises :class:`StorageError` naming the URI for one pyarrow cannot open (unknown scheme,
    malformed), a location it cannot reach or read (no such bucket, no credentials, endpoint
    down: pyarrow's message is kept), or a URI that names no folder inside its bucket or host.
    """
    if not is_uri(storage):
        return Storage(str(Path(storage).expanduser().resolve()), Path(storage).expanduser().resolve())
    text = str(storage)
    import pyarrow.fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError, TypeError) as err:
        raise StorageError(f"--storage {text!r}: pyarrow cannot open this URI ({err}); --storage takes a folder path or a "
                           f"URI pyarrow opens, such as s3://bucket/prefix (S3 options in the query, e.g. "
                           f"?endpoint_override=host:9000&scheme=http)") from None
    root = root.rstrip("/")
    if not root:
        raise StorageError(f"--storage {text!r} names no bucket or folder; give one, e.g. s3://bucket/prefix")
    if getattr(filesystem, "type_name", "") == "local":
        return Storage(str(Path(root).resolve()), Path(root).resolve())
    bucket = root.split("/", 1)[0]
    try:
        top, info = filesystem.get_file_info([bucket, root])
    except OSError as err:
        raise StorageError(f"--storage {text!r} cannot be reached: {err}") from None
    if top.type == pafs.FileType.NotFound:
        raise StorageError(f"--storage {text!r}: its bucket {bucket!r} does not exist there (or these credentials do not "
                           f"see it); create it first")
    if info.type == pafs.FileType.File:
        raise StorageError(f"--storage {text!r} is a file, not a folder of experiments")
    parts = urlsplit(text)
    local = copies_folder() / parts.scheme / (parts.netloc + parts.path).strip("/")
    return Storage(text, local, filesystem, root)


def local_experiment(path: str | Path) -> Path:
    """The folder of the experiment ``path`` on this machine: ``path`` itself, or for an experiment's
    URI (``s3://bucket/prefix/name``) its local copy, brought up to date from the URI first."""
    if not is_uri(path):
        return Path(path)
    storage, name = split_experiment_uri(str(path))
    storage.pull(name)
    return storage.local / name


def split_experiment_uri(uri: str) -> tuple[Storage, str]:
    """``(storage, name)`` of an experiment's URI ``scheme://bucket/prefix/name[?query]``."""
    parts = urlsplit(uri)
    path = parts.path.rstrip("/")
    parent, _, name = path.rpartition("/")
    if not name or not (parts.netloc + parent).strip("/"):
        raise StorageError(f"{uri!r} names no experiment inside a bucket; give scheme://bucket/prefix/<name>")
    from .experiment_folder import check_name

    problem = check_name(name)
    if problem:
        raise StorageError(f"{uri!r}: {problem}")
    storage = f"{parts.scheme}://{parts.netloc}{parent}" + (f"?{parts.query}" if parts.query else "")
    return open_storage(storage), name
