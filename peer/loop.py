"""One asyncio event loop on a background thread, for hivemind's P2P handlers and calls.

The training loop is plain synchronous code; network handlers must keep running while it trains,
so they live on this loop and the synchronous side submits coroutines with ``run``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine


class LoopThread:
    def __init__(self, name: str = "gpuflex-io"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Cancel what is still running (closing its streams while the loop can), then stop."""
        if not self._thread.is_alive():
            return

        async def cancel_pending():
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        try:
            self.run(cancel_pending(), timeout=5)
        except Exception:
            pass  # stopping anyway
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
