"""``python -m server`` (or ``hogwild-server``): the HTTP server under uvicorn.

SIGTERM and Ctrl-C first stop the engine gracefully, so every open stream ends with its done event, and
only then let uvicorn close the connections. A drain that finishes exits quietly: with status 0 after
SIGTERM, 130 after Ctrl-C (SIGINT), as a shell reports an interrupted command. A second signal stops at
once. The spawned engine ignores the terminal's Ctrl-C (engine/connection.py): the server drains it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from server.app import create_app
from server.hub import Hub
from server.settings import parse_settings

DRAIN_TIMEOUT_S = 15.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, hub: Hub):
        super().__init__(config)
        self.hub = hub
        self.draining: asyncio.Task[None] | None = None
        self.interrupted = False  # the drain began with Ctrl-C

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining is not None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self.interrupted = sig == signal.SIGINT
        hub = self.hub

        async def drain() -> None:
            drained = False
            try:
                await asyncio.wait_for(hub.stop(), DRAIN_TIMEOUT_S)
                drained = True
            finally:
                await asyncio.sleep(0.2)  # let the streams flush their done events
                super(DrainingServer, self).handle_exit(sig, frame)
                if drained:  # a drain that finished is a clean exit: uvicorn would re-raise the signal
                    self._captured_signals.clear()

        self.draining = asyncio.get_event_loop().create_task(drain())


def main(argv: list[str] | None = None) -> int:
    try:
        return serve(argv)
    except KeyboardInterrupt:  # Ctrl-C before the server took its signals, or after a drain cut short
        return 130


def serve(argv: list[str] | None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.hub)
    app.state.stop_server = lambda: server.handle_exit(signal.SIGTERM, None)
    server.run()
    if server.interrupted:
        return 130
    return int(app.state.exit_code)  # 2: the engine cannot serve the model (a bad path, say)


if __name__ == "__main__":
    sys.exit(main())
