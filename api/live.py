"""Serving through a rebuild: the server follows the atlas's manifest.

An ``ingest`` or ``label`` that publishes into the atlas being served writes new parts beside the
old ones and then replaces the manifest (``store.publish``). Each request asks ``LiveService.current``
for the service to answer from; when the manifest has changed, the new atlas is opened and warmed
up in the background while requests go on being answered from the old one, and then it replaces
the old one between two requests. A request is answered from one atlas only, old or new: it holds
its service for its whole life, and the old parts stay on disk until the next publish after that.

An atlas on an object store is served from its local mirror (``store/location.py``), which
``RemoteFollower`` refreshes on a timer: a new publish on the store becomes a new mirror manifest,
and from there it is followed like a local one.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from featureatlas.store import manifest as M
from featureatlas.store.atlas import Atlas
from featureatlas.store.location import FOLLOW_EVERY_S, mirror

from .service import AtlasService

log = logging.getLogger(__name__)
# How long a replaced atlas keeps its SQL workers: longer than any request on it may still run.
RETIRE_AFTER_S = 60.0
# How long a stopping server waits for a mirror download in progress to end.
CLOSE_WAIT_S = 10.0


def _stamp(root: Path) -> tuple[int, int] | None:
    """What changes when the manifest is replaced (a publish writes a new file and renames it)."""
    try:
        st = os.stat(root / M.MANIFEST)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class LiveService:
    def __init__(self, atlas: Atlas, *, probe_device: str | None = None):
        """``atlas``: opened before this; a publish since then is noticed at the first request."""
        self.root = atlas.root
        self._probe_device = probe_device
        self._service = AtlasService(atlas, probe_device=probe_device)
        self._stamp = _stamp(self.root) if M.read(self.root) == atlas.manifest else None
        self._lock = threading.Lock()
        self._switching = False

    def warm_up(self) -> None:
        self._service.warm_up()

    def current(self) -> AtlasService:
        """The service to answer this request from (a stat of the manifest: microseconds)."""
        stamp = _stamp(self.root)
        if stamp is not None and stamp != self._stamp:
            with self._lock:
                start = not self._switching and stamp != self._stamp
                self._switching |= start
            if start and not self._service.atlas.base.exists():
                # Two publishes since the last request: the old parts are gone, so this request
                # cannot be answered from them; it waits for the switch (rare: an idle server).
                self._switch(stamp)
            elif start:
                threading.Thread(target=self._switch, args=(stamp,), name="atlas-switch", daemon=True).start()
        return self._service

    def _switch(self, stamp: tuple[int, int]) -> None:
        atlas = None
        try:
            atlas = Atlas(self.root)
            service = AtlasService(atlas, probe_device=self._probe_device)
            service.warm_up()
        except Exception:
            if atlas is not None:
                atlas.close()
            # A damaged or unreadable new atlas: keep serving the old one, and try again only when
            # the manifest changes again.
            log.exception("the atlas at %s changed but could not be opened; still serving the previous one", self.root)
            with self._lock:
                self._stamp, self._switching = stamp, False
            return
        with self._lock:
            old, self._service = self._service, service
            self._stamp, self._switching = stamp, False
        log.info("now serving the atlas published at %s", service.atlas.manifest.get("created_at"))
        retire = threading.Timer(RETIRE_AFTER_S, old.atlas.close)
        retire.daemon = True
        retire.start()

    def close(self) -> None:
        self._service.atlas.close()


class RemoteFollower:
    """Keeps the mirror of an atlas on an object store current while a server reads it: every
    ``every_s`` seconds ``mirror`` compares the store's manifest with the mirrored one and, after a
    publish there, downloads the new parts beside the ones being served and writes the mirror's
    manifest last. A store that does not answer is logged and the mirrored publish goes on being
    served: a reader must outlive a flaky network."""

    def __init__(self, location: str, every_s: float = FOLLOW_EVERY_S):
        self.location, self.every_s = location, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="atlas-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                mirror(self.location)
            except Exception as e:  # noqa: BLE001 (any failure of the store: logged, retried next time)
                log.warning("could not refresh the mirror of %s; still serving the last publish: %s", self.location, e)

    def close(self) -> None:
        """Stops asking, and waits a while for a download in progress: pyarrow's S3 client may hang
        or crash when the interpreter exits under one. A longer one is left to finish or die with
        the process (its ``.partial`` folder is removed by the next mirroring)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(CLOSE_WAIT_S)
