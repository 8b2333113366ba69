"""An input image that holds a run at a known point: a symlink to a FIFO that is fed only when the test says so."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class HeldImage:
    """An input image that is a symlink to a FIFO: a process reading it waits until feed() is called, then every
    later reader gets the image at once. It holds a run at a known point without changing what it computes."""

    def __init__(self, link: Path, image: Path):
        """link (in the input folder) will read as image (kept outside it: hidden files are images too)."""
        self.fifo = image.with_name(f"{image.name}.fifo")
        self.data = image.read_bytes()
        os.mkfifo(self.fifo)
        link.symlink_to(self.fifo)
        self.done = threading.Event()
        self.feeder = threading.Thread(target=self._feed, daemon=True)

    def feed(self) -> None:
        self.feeder.start()

    def _feed(self) -> None:
        while not self.done.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader opens it
            except OSError:
                time.sleep(0.01)
                continue
            os.set_blocking(fd, True)
            try:
                with open(fd, "wb") as pipe:
                    pipe.write(self.data)
            except BrokenPipeError:  # the reader was killed
                pass

    def close(self) -> None:
        self.done.set()
