"""The server a replica runs: `loraswap serve` from LORASWAP_* (set by the replica), in a process that stops itself
when its parent, the replica's Ray actor, is gone (killed, or its node lost), so no server outlives its replica.

    python -m loraswap.server.cluster.child PARENT_PID
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def watch_parent(parent: int, interval: float = 0.5) -> None:
    """SIGTERM this process once `parent` is no longer its parent: the server drains and exits as on any SIGTERM."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="loraswap-parent-watch").start()


def main(argv: list[str]) -> int:
    from loraswap.server.api.app import serve
    from loraswap.server.settings import Settings

    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m loraswap.server.cluster.child PARENT_PID", file=sys.stderr)
        return 2
    watch_parent(int(argv[0]))
    return serve(Settings.from_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
