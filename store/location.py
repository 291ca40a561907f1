"""Where an atlas lives: a local folder, a ``file://`` URI, or an object store (``s3://bucket/path``).

An atlas on an object store has the local layout: ``manifest.json`` naming ``data/<id>/`` (the
dictionary, the LanceDB tables, the DuckDB file). It is written by uploading a locally built
publish, parts first and the manifest last (the manifest is the commit record there too: a reader
never finds one that names parts not yet uploaded), and read through a local mirror of the current
publish, refreshed whenever the remote manifest changes. The mirror is what lets DuckDB answer SQL
over a remote atlas with no extension to download (none can be, offline) and every query stay as
fast as on a local one.

The object store is reached through pyarrow's filesystems. Credentials come from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``) and an
S3-compatible server from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``); never from flags,
which other users see in the process list.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from . import manifest as M
from .errors import BadParameter, DamagedAtlas

log = logging.getLogger(__name__)
REMOTE_SCHEMES = ("s3",)
# How often a server over a remote atlas asks the store for a new publish (one small GET each time).
FOLLOW_EVERY_S = 60.0


def is_remote(location: str | os.PathLike[str]) -> bool:
    return urlparse(os.fspath(location)).scheme in REMOTE_SCHEMES


def local_path(location: str | os.PathLike[str], *, flag: str = "--atlas") -> Path:
    """A folder from a path or a ``file://`` URI (percent-escapes decoded); object store URIs are
    for ``mirror`` and ``upload``, other schemes are refused."""
    text = os.fspath(location)
    if "://" not in text:
        return Path(text).expanduser()
    parsed = urlparse(text)
    if parsed.scheme != "file":
        raise BadParameter(flag, f"{parsed.scheme}:// is not an atlas location; give a folder, a file:// URI or an "
                                 f"s3:// URI")
    if parsed.netloc not in ("", "localhost"):
        raise BadParameter(flag, f"file://{parsed.netloc}/ names another machine; give a local folder")
    return Path(url2pathname(parsed.path))


def work_folder(location: str, *, flag: str = "--atlas") -> Path:
    """The local folder an atlas at ``location`` is built in (its stages' cache, its publish): the
    folder itself for a local atlas; for a remote one, a folder of the user's cache named after
    the URI (``FEATUREATLAS_CACHE``, else ``~/.cache/featureatlas``)."""
    if not is_remote(location):
        return local_path(location, flag=flag)
    return _cache_folder("work", location, flag=flag)


def _cache_folder(kind: str, location: str, *, flag: str) -> Path:
    """``<cache>/<kind>/<bucket>-<hash of the URI>``: building and mirroring keep apart, so reading
    an atlas on the machine that builds it never touches the build's folder."""
    _filesystem(location, flag=flag)  # a malformed URI fails here, before any work
    uri = location.rstrip("/")
    return user_cache() / kind / f"{urlparse(uri).netloc}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def user_cache() -> Path:
    """The user's Feature Atlas cache: ``FEATUREATLAS_CACHE``, else ``~/.cache/featureatlas``."""
    return Path(os.environ.get("FEATUREATLAS_CACHE", "~/.cache/featureatlas")).expanduser()


def _filesystem(location: str, *, flag: str = "--atlas") -> tuple[Any, str]:
    """(pyarrow filesystem, path in it without a trailing slash) for an object store URI."""
    from pyarrow import fs

    parsed = urlparse(location)
    if not parsed.netloc:
        raise BadParameter(flag, f"{location!r} names no bucket; write s3://bucket/path")
    if parsed.query or parsed.params or parsed.fragment or "@" in parsed.netloc:
        raise BadParameter(flag, "give credentials and options in the environment (AWS_ACCESS_KEY_ID, "
                                 "AWS_ENDPOINT_URL, ...), not in the URI: it shows up in process lists")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options: dict[str, Any] = {"endpoint_override": endpoint} if endpoint else {}
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")


def upload(local: Path, location: str) -> None:
    """The current publish of the atlas built at ``local`` onto the object store at ``location``:
    its parts, then its manifest. The publish before stays (a reader that read the old manifest a
    moment ago may still be mirroring it); older ones are removed. One writer at a time per URI,
    as for a local atlas (two builds uploading together could remove each other's parts)."""
    from pyarrow import fs

    remote, base = _filesystem(location)
    manifest = M.read(local)
    if manifest is None:
        raise RuntimeError(f"{local} holds no published atlas to upload")
    folder = M.folder(manifest)
    if not folder:
        raise RuntimeError(f"{local} is an atlas of format 1 (parts at the top level): re-run the ingest to upload it")
    previous = _remote_manifest(remote, base, location)
    keep = {folder, M.folder(previous) if previous else None}
    try:
        fs.copy_files(str(local / folder), f"{base}/{folder}", source_filesystem=fs.LocalFileSystem(),
                      destination_filesystem=remote)
        with remote.open_output_stream(f"{base}/{M.MANIFEST}") as out:
            out.write(json.dumps(manifest, indent=2, default=str).encode())
    except OSError as e:
        raise BadParameter("--atlas", f"uploading to {location} failed ({_first_line(e)}); the atlas there is "
                                      "unchanged, and a re-run uploads again (its stages are reused)") from None
    try:  # committed: tidying, which must not turn a finished upload into a failed one
        for info in remote.get_file_info(fs.FileSelector(f"{base}/{M.DATA}", allow_not_found=True)):
            if f"{M.DATA}/{info.base_name}" not in keep:
                remote.delete_dir(info.path)
    except OSError:
        log.warning("uploaded %s, but could not remove its older parts", location, exc_info=True)


def mirror(location: str) -> Path:
    """A local copy of the current publish of the atlas at ``location``, downloaded when the remote
    manifest differs from the mirrored one. As in a local atlas, a new publish goes to its own
    folder and the manifest naming it is written last; the folder before stays for a reader that
    still has it open (a server started earlier), older ones go. One mirroring at a time."""
    from pyarrow import fs

    remote, base = _filesystem(location)
    manifest = _remote_manifest(remote, base, location)
    if manifest is None:
        raise DamagedAtlas(location, "holds no atlas (no manifest.json there); publish one with "
                                    "`featureatlas ingest --atlas URI`")
    local = _cache_folder("mirrors", location, flag="--atlas")
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".mirror.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second reader waits, then finds the mirror current
        current = M.read(local)
        if current == manifest:
            return local
        folder = M.folder(manifest)
        partial = local / f"{folder}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            fs.copy_files(f"{base}/{folder}", str(partial), source_filesystem=remote,
                          destination_filesystem=fs.LocalFileSystem())
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)  # a full disk is not left full until the next try
            raise BadParameter("--atlas", f"downloading {location} failed: {_first_line(e)}") from None
        shutil.rmtree(local / folder, ignore_errors=True)  # a folder of the same name is a re-labelled copy
        partial.rename(local / folder)
        M.write(local, manifest)
        keep = {Path(folder).name, Path(M.folder(current)).name if current else None}
        for old in (local / M.DATA).iterdir():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    return local


def readable(location: str | os.PathLike[str], *, flag: str = "--atlas") -> Path:
    """The local folder the atlas at ``location`` is opened from: the folder itself, or the mirror
    of a remote atlas, brought up to date first."""
    return mirror(os.fspath(location)) if is_remote(location) else local_path(location, flag=flag)


def remote_manifest(location: str) -> dict[str, Any] | None:
    """The manifest on the object store at ``location`` (None where there is none yet); a bucket
    that is not there, or cannot be reached with these credentials, is ``BadParameter``."""
    from pyarrow import fs

    remote, base = _filesystem(location)
    bucket = base.split("/")[0]
    try:
        missing = remote.get_file_info(bucket).type == fs.FileType.NotFound
    except OSError as e:
        raise BadParameter("--atlas", f"cannot read {location}: {_first_line(e)}") from None
    if missing:
        raise BadParameter("--atlas", f"cannot read {location}: there is no bucket {bucket!r} (create it first)")
    return _remote_manifest(remote, base, location)


def _remote_manifest(remote: Any, base: str, location: str) -> dict[str, Any] | None:
    try:
        with remote.open_input_stream(f"{base}/{M.MANIFEST}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except OSError as e:  # no such bucket, no credentials, no server: said before any work is done
        raise BadParameter("--atlas", f"cannot read {location}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
