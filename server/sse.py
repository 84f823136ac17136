"""Server-sent events through sse-starlette, with less work per event."""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send


class TokenEventSourceResponse(EventSourceResponse):
    """sse-starlette's response, without a cancel scope around each send when no send timeout is set.

    A stream sends one event per token; on a small CPU the event loop's time per event is taken from
    llama.cpp's threads, so it is kept short.
    """

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)
