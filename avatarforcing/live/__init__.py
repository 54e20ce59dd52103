"""Live talking avatars over WebSocket (``python serve.py``; the protocol: docs/protocol.md).

protocol.py  message schema, validation, the binary frame layout (shared with scripts/live_client.py)
session.py   one live stream: audio in as it arrives, frames + their audio out (ready / step / close)
engine.py    the one worker thread per model that steps every ready session
outbox.py    the bounded per-client send queue (slow readers lose the oldest frames)
settings.py  the server's limits
server.py    the FastAPI app: / (static/), /api/info, /ws
"""
