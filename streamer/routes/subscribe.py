"""/v1/subscribe?session=ID|*[&after_seq=N][&interim=1]: watchers. A watcher registers with the
hub, first getting what it missed after `after_seq` (from this instance's buffer, the durable
store or, for a session another instance runs, the bus), exactly once; it has nothing to say, so
its frames are ignored."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer import protocol as P
from streamer.events.bus import BusError
from streamer.events.fanout import Subscriber
from streamer.routes.sessions_api import MAX_SQL_INT
from streamer.routes.host import SessionHost



def attach(app: SessionHost, sub: Subscriber, key: str, after_seq: int | None) -> None:
    """Register `sub` for `key`, first replaying what it missed after `after_seq`. Nothing
    is published in between (one thread), so every event arrives exactly once."""
    if after_seq is not None:
        texts, complete = app.hub.replay(key, after_seq)
        if not complete:
            sub.offer(json.dumps(P.event(P.ERROR, key, -1, **P.error_fields(
                P.E_REPLAY_GAP, f"events after seq {after_seq} of {key} are no longer buffered; "
                                f"replaying from the oldest kept"))))
        for text in texts:
            sub.offer(text)
    app.hub.add(key, sub)

async def attach_from_bus(app: SessionHost, sub: Subscriber, key: str, after_seq: int) -> None:
    """`attach` when the replay must be read from the bus (an await). Exactly once: `sub` is
    registered first with live events held; then the replay is sent, then the held events
    newer than the last replayed seq; later live events up to that seq are dropped too."""
    sub.held = []
    app.hub.add(key, sub)
    try:
        events, complete = await app.bus.history(key, after_seq)
    except BusError:  # Redis down: what this instance has, flagged as incomplete
        texts, _ = app.hub.replay(key, after_seq)
        events, complete = [(json.loads(t)["seq"], t) for t in texts], False
    except BaseException:
        app.hub.remove(key, sub)
        raise
    held, sub.held = sub.held, None
    if not complete:
        sub.offer(json.dumps(P.event(P.ERROR, key, -1, **P.error_fields(
            P.E_REPLAY_GAP, f"events after seq {after_seq} of {key} are no longer buffered; "
                            f"replaying from the oldest kept"))))
    last, finished = after_seq, False
    for seq, text in events:
        sub.offer(text)
        last = max(last, seq)
    for item in held:
        if isinstance(item, tuple):
            sub.finish(*item)
            finished = True
        elif json.loads(item)["seq"] > last:
            sub.offer(item)
    sub.after = last  # the live reader may still be behind the replay
    if not finished and events and json.loads(events[-1][1])["type"] == P.SESSION_ENDED:
        sub.finish(*app.hub.end_close)  # the replay was all of it

async def subscriber_connection(app: SessionHost, ws: ServerConnection, sub: Subscriber, key: str,
                                after_seq: str | None = None) -> None:
    if app.hub.subscriber_count() >= app.config.server.max_subscribers:  # sources' own sockets do not count
        sub.finish(P.CLOSE_TRY_AGAIN, f"too many subscribers (limit {app.config.server.max_subscribers})")
        await sub.task
        return
    after: int | None = None
    if after_seq is not None:
        try:
            after = int(after_seq)
        except ValueError:
            after = None
        if after is None or key == P.ALL_SESSIONS or not -1 <= after <= MAX_SQL_INT:  # the store's INTEGER
            sub.offer(json.dumps(P.event(P.ERROR, key, -1, **P.error_fields(
                P.E_BAD_REQUEST, "after_seq must be an integer >= -1 and needs a single session"))))
            sub.finish(P.CLOSE_POLICY, "bad after_seq")
            await sub.task
            return
    if after is not None and app.bus.remote and not app.hub.covers(key, after):
        await attach_from_bus(app, sub, key, after)  # e.g. a session that another instance runs
    else:
        attach(app, sub, key, after)
    if after is not None and app.hub.is_over(key) and key not in app.sessions:
        sub.finish(*app.hub.end_close)  # the session is over: the replay was all of it
    try:
        async for _ in ws:  # subscribers have nothing to say; their frames are ignored
            pass
    except ConnectionClosed:
        pass
    finally:
        app.hub.remove(key, sub)
        if not sub.task.done():
            sub.task.cancel()  # the connection is gone: nothing left to write
        await asyncio.gather(sub.task, return_exceptions=True)
