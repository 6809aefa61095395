"""Reading several reply streams at once, as several users would."""

from __future__ import annotations

import threading
from collections.abc import Iterable


def last_items_together(streams: list[Iterable], seconds: float = 60) -> list:
    """Drain every stream on a thread of its own, all at once; the last item of each, in order."""
    results: list = [None] * len(streams)

    def drain(index: int) -> None:
        for item in streams[index]:
            results[index] = item

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
    return results
