"""A running trial’s heartbeat thread."""

from __future__ import annotations

import logging
import threading
import time

from hpo.search.outages import connection_error, first_line
from hpo.search.storage import Storage

log = logging.getLogger(__name__)


class Heartbeat:
    """A running trial's heartbeat, sent from a thread every `interval` seconds until the block ends.

    `also` runs after each beat in the same thread (a worker reaps dead trials there, so that a
    dead worker's trial is found while every live worker is busy training).
    """

    def __init__(self, storage: Storage, trial_id: int, interval: float, also=None):
        self.storage, self.trial_id, self.interval, self.also = storage, trial_id, interval, also
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        while True:
            started = time.monotonic()
            self.storage.record_heartbeat(self.trial_id)
            if self.also is not None and self.storage.beating:
                try:
                    with self.storage.failing_fast():
                        self.also()
                except Exception as e:  # the next beat tries again; the trial must not die of it
                    log.warning("reaping dead trials failed (%s)", first_line(connection_error(e) or e))
            # Beats keep their schedule however long the reaping took (slow queries after an outage
            # would otherwise space them past what other hosts' reapers confirm a death by).
            if self._stop.wait(max(0.0, self.interval - (time.monotonic() - started))):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
