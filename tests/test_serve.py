"""The live server (avatarforcing/live/, serve.py, scripts/live_client.py) on the demo model, on CPU.

Exactness (streamed frames = AvatarPipeline.stream), the protocol's errors and close codes, the limits
(message size, sessions, idle time), backpressure (a slow reader loses frames, counted), freed state after
disconnects, and the real server + client end to end."""
from __future__ import annotations

import base64
import gc
import importlib.util
import json
import time
import weakref

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("websockets")
from fastapi.testclient import TestClient  # noqa: E402
from avatarforcing.live.launch import running_server  # noqa: E402
from live_server import ROOT, example_wav  # noqa: E402

from avatarforcing.config import load_config  # noqa: E402
from avatarforcing.live import protocol as P  # noqa: E402
from avatarforcing.live.server import EXAMPLE_IMAGE, create_app  # noqa: E402
from avatarforcing.live.settings import Settings  # noqa: E402
from avatarforcing.media import load_audio, probe_video  # noqa: E402
from avatarforcing.pipeline import AvatarPipeline, default_config_path  # noqa: E402

START = {"type": "start", "image": "example", "sample_rate": 16000, "format": "pcm_s16le", "channels": 1}


@pytest.fixture(scope="module")
def pipe():
    return AvatarPipeline.from_config(load_config(default_config_path()))


@pytest.fixture(scope="module")
def wav():
    return load_audio(ROOT / "assets" / "example.wav")[:3 * 16000]      # 3 s: 5 blocks, 81 frames


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, Settings(stats_interval=0.05, batch_sessions=False))) as c:
        yield c


def _s16(wav) -> bytes:
    return np.clip(np.round(wav * 32768), -32768, 32767).astype("<i2").tobytes()


def _drain(ws):
    """Everything the server sends until it closes -> (frames, json messages, close code)."""
    frames, messages = [], []
    while True:
        msg = ws.receive()
        if msg["type"] == "websocket.close":
            return frames, messages, msg["code"]
        if msg.get("bytes") is not None:
            frames.append(P.unpack_frame(msg["bytes"]))
        else:
            messages.append(json.loads(msg["text"]))


def _expect_error(ws, code: int, *words: str) -> str:
    frames, messages, got = _drain(ws)
    assert got == code and messages and messages[-1]["type"] == "error", (got, messages)
    text = messages[-1]["message"]
    assert "\n" not in text and all(w in text for w in words), text
    return text


def _wait_idle(app, timeout: float = 5.0) -> dict:
    """Until no connection and no engine session is left (state freed) -> the server's info."""
    live, deadline = app.state.live, time.monotonic() + timeout
    while (live.connections or len(live.engine)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return live.info()


# ---- exactness and the happy path -------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
def test_streamed_frames_equal_pipeline_stream(pipe, wav, client, batched):
    """Two concurrent sessions (one engine): each equals AvatarPipeline.stream for its seed (the demo's mel
    features stream exactly), with the frame's own audio, in whole-sample chunks of any size.  Stepped one
    after the other: bit for bit.  Batched (their forwards stacked): the same frames up to float rounding
    (raw frames differ by <= 1 level, tests/test_multistream.py; after JPEG every frame > 45 dB PSNR), and the
    forwards were shared."""
    if batched:
        with TestClient(create_app(pipe, Settings(stats_interval=0.05, batch_wait_ms=2000))) as c:
            return _check_two_sessions(pipe, wav, c, exact=False)
    _check_two_sessions(pipe, wav, client, exact=True)


def _check_two_sessions(pipe, wav, client, exact: bool):
    seeds = (5, 6)
    rng = np.random.default_rng(0)
    sockets = [client.websocket_connect("/ws").__enter__() for _ in seeds]
    for ws, seed in zip(sockets, seeds):
        ws.send_text(json.dumps({**START, "seed": seed, "format": "pcm_f32le"}))
        ready = ws.receive_json()
        assert ready["type"] == "ready" and (ready["width"], ready["height"], ready["fps"]) == (64, 64, 25)
    data, at = wav.astype("<f4").tobytes(), 0
    while at < len(data):                                   # interleaved, ragged chunks
        n = 4 * int(rng.integers(1, 2000))
        for ws in sockets:
            ws.send_bytes(data[at:at + n])
        at += n
    for ws in sockets:
        ws.send_text('{"type": "end"}')
    for ws, seed in zip(sockets, seeds):
        frames, messages, code = _drain(ws)
        ws.__exit__(None, None, None)
        expected = np.concatenate([f[0] for f in pipe.stream(EXAMPLE_IMAGE, wav, seed=seed)])   # [81, H, W, 3]
        assert code == 1000 and [f.index for f in frames] == list(range(len(expected))) == list(range(81))
        if exact:
            assert all(f.jpeg == P.encode_jpeg(e) for f, e in zip(frames, expected))
        else:
            def pixels(jpeg):
                return np.asarray(P.decode_image(jpeg).convert("RGB"), dtype=int)
            mse = max(float(((pixels(f.jpeg) - pixels(P.encode_jpeg(e))) ** 2).mean()) for f, e in zip(frames, expected))
            print(f"batched sessions vs pipe.stream: worst frame PSNR {10 * np.log10(255 ** 2 / max(mse, 1e-12)):.1f} dB")
            assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 45
        assert [f.pts for f in frames] == [i / 25 for i in range(81)]
        pcm = np.concatenate([f.pcm for f in frames])
        assert np.array_equal(pcm[:len(wav)], np.round(wav * 32768).astype(np.int16)) and not pcm[len(wav):].any()
        done = messages[-1]
        assert done["type"] == "done" and done["frames_generated"] == done["frames_sent"] == 81
        assert done["dropped"] == 0 and done["starved"] == 0
        assert any(m["type"] == "stats" and {"fps", "behind_realtime", "dropped"} <= set(m) for m in messages)
    assert _wait_idle(client.app)["connections"] == 0
    if not exact:
        assert client.app.state.live.batcher.stats["max_batch"] >= 2      # the two sessions shared forwards


def _main(module: str, argv, capsys) -> tuple[int, str, str]:
    """Run a script's main(argv) in this process -> (exit status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(module.replace("/", "_")[:-3], ROOT / module)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    status = script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_live_client_writes_mp4_and_reports(tmp_path, capsys):
    """python serve.py (real uvicorn) + scripts/live_client.py: the mp4 has the expected frames and audio,
    the last stdout line is the JSON report."""
    audio = example_wav(tmp_path / "speech.wav", seconds=3.0)
    out = tmp_path / "live.mp4"
    with running_server("--no-warmup") as url:
        status, stdout, err = _main("scripts/live_client.py", ["--server", url, "--audio", audio, "--image",
                                                               EXAMPLE_IMAGE, "--output", out, "--pace", "0"], capsys)
    assert status == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["frames"] == report["received"] == 81 and report["dropped"] == 0
    for key in ("fps", "first_frame_latency_s", "delay_mean_s", "delay_p95_s"):
        assert report[key] > 0, key
    assert probe_video(out) == {"frames": 81, "fps": 25.0, "width": 64, "height": 64, "has_audio": True}
    # the server is gone now: a one-line error, exit status 1, no file
    status, _, err = _main("scripts/live_client.py", ["--server", url, "--audio", audio, "--output",
                                                      tmp_path / "none.mp4"], capsys)
    assert status == 1 and err.startswith("error: cannot connect") and err.count("\n") == 1
    assert not (tmp_path / "none.mp4").exists()


@pytest.mark.parametrize("argv, words", [
    (["schedule.window_blocks=abc"], ["window_blocks"]),
    (["--max-sessions", "0"], ["--max-sessions must be >= 1, got 0"]),
    (["--port", "http"], ["--port", "invalid int"]),
])
def test_serve_cli_errors_are_one_line(argv, words, capsys):
    status, _, err = _main("serve.py", argv, capsys)
    assert status == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


# ---- malformed input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first, code, words", [
    ("hello", 1008, ["not JSON"]),
    ('{"type": "hello"}', 1008, ['"type":"start"']),
    ('{"type": "start", "seed": "one"}', 1008, ["'seed'", "integer"]),
    ('{"type": "start", "voice": 1}', 1008, ["unknown field", "voice"]),
    ('{"type": "start", "image": "@@not base64@@"}', 1008, ["base64"]),
    ('{"type": "start", "format": "mp3"}', 1003, ["mp3", "pcm_s16le"]),
    ('{"type": "start", "channels": 2}', 1003, ["mono"]),
    ('{"type": "start", "sample_rate": 1000}', 1003, ["sample_rate 1000"]),
    (b"\x00\x01" * 100, 1008, ["start message", "not binary"]),
])
def test_malformed_start_message(client, first, code, words):
    with client.websocket_connect("/ws") as ws:
        ws.send_bytes(first) if isinstance(first, bytes) else ws.send_text(first)
        _expect_error(ws, code, *words)
    assert _wait_idle(client.app)["connections"] == 0


def test_image_that_is_not_an_image(client):
    with client.websocket_connect("/ws") as ws:
        ws.send_text(json.dumps({**START, "image": base64.b64encode(b"GIF? no, plain text").decode()}))
        _expect_error(ws, 1003, "not a readable image", "PNG or JPEG")


@pytest.mark.parametrize("message, words", [
    (b"\x01\x02\x03", ["3 bytes", "whole pcm_s16le samples"]),
    ("some text", ["expected binary pcm_s16le audio", "end"]),
])
def test_audio_that_is_not_pcm(client, message, words):
    with client.websocket_connect("/ws") as ws:
        ws.send_text(json.dumps(START))
        assert ws.receive_json()["type"] == "ready"
        ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(message)
        _expect_error(ws, 1003, *words)
    assert _wait_idle(client.app)["engine_sessions"] == 0


def test_message_after_end_is_refused(client, wav):
    with client.websocket_connect("/ws") as ws:
        ws.send_text(json.dumps(START))
        ws.receive_json()
        ws.send_text('{"type":"end"}')
        ws.send_bytes(_s16(wav[:640]))
        _expect_error(ws, 1008, "after")


def test_oversized_messages(pipe):
    with TestClient(create_app(pipe, Settings(max_message_bytes=4096))) as c:
        with c.websocket_connect("/ws") as ws:
            ws.send_text(json.dumps({**START, "image": base64.b64encode(EXAMPLE_IMAGE.read_bytes()).decode()}))
            _expect_error(ws, 1009, "over the server's limit of 4096")
        with c.websocket_connect("/ws") as ws:
            ws.send_text(json.dumps(START))
            ws.receive_json()
            ws.send_bytes(b"\x00" * 4098)
            _expect_error(ws, 1009, "4098 bytes")
        assert _wait_idle(c.app)["connections"] == 0


# ---- limits, faults, freed state -----------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_session(client, wav):
    with client.websocket_connect("/ws") as ws:
        ws.send_text(json.dumps(START))
        ws.receive_json()
        ws.send_bytes(_s16(wav))
        while True:                                            # until the first generated block
            msg = ws.receive()
            if msg.get("bytes") is not None and P.unpack_frame(msg["bytes"]).index >= 1:
                break
        assert client.app.state.live.connections == 1 and len(client.app.state.live.engine) == 1
    info = _wait_idle(client.app)
    assert info["connections"] == 0 and info["engine_sessions"] == 0


def test_connect_disconnect_cycles_leave_no_state(pipe, wav):
    """100 start / disconnect cycles: every session object is freed and the RSS stays flat."""
    psutil = pytest.importorskip("psutil")
    with TestClient(create_app(pipe, Settings())) as c:
        engine, sessions = c.app.state.live.engine, weakref.WeakSet()
        add = engine.add
        engine.add = lambda session, deliver: (sessions.add(session), add(session, deliver))

        def cycle(i):
            with c.websocket_connect("/ws") as ws:
                ws.send_text(json.dumps({**START, "seed": i}))
                assert ws.receive_json()["type"] == "ready"
                ws.send_bytes(_s16(wav[:1600 * (i % 5)]))
                P.unpack_frame(ws.receive_bytes())                   # the reference frame: the stream has state

        for i in range(10):                                           # warm-up: allocator pools, caches
            cycle(i)
        _wait_idle(c.app)
        gc.collect()
        rss = psutil.Process().memory_info().rss
        for i in range(100):
            cycle(i)
        info = _wait_idle(c.app)
        gc.collect()
        growth = psutil.Process().memory_info().rss - rss
    assert info["connections"] == 0 and info["engine_sessions"] == 0
    assert len(sessions) == 0, f"{len(sessions)} sessions still alive"
    assert growth < 40 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MiB over 100 cycles"


def test_max_sessions_refuses_with_try_again_later(pipe):
    with TestClient(create_app(pipe, Settings(max_sessions=1))) as c:
        with c.websocket_connect("/ws") as first:
            first.send_text(json.dumps(START))
            assert first.receive_json()["type"] == "ready"
            with c.websocket_connect("/ws") as second:
                _expect_error(second, 1013, "busy", "1", "try again later")
        _wait_idle(c.app)
        with c.websocket_connect("/ws") as third:             # a freed slot is usable again
            third.send_text(json.dumps(START))
            assert third.receive_json()["type"] == "ready"


def test_idle_timeout(pipe):
    with TestClient(create_app(pipe, Settings(idle_timeout=0.3))) as c:
        with c.websocket_connect("/ws") as ws:                # silent before the start message
            _expect_error(ws, 1008, "no start message for 0.3 s")
        with c.websocket_connect("/ws") as ws:                # silent mid-stream
            ws.send_text(json.dumps(START))
            ws.receive_json()
            t = time.monotonic()
            _expect_error(ws, 1008, "no message for 0.3 s", "end")
            assert time.monotonic() - t < 5
        info = _wait_idle(c.app)
        assert info["connections"] == 0 and info["engine_sessions"] == 0


# ---- pacing and backpressure ----------------------------------------------------------------------------------


def test_slow_reader_loses_oldest_frames_and_they_are_counted(pipe, wav):
    """A block (16 frames) lands at once in a 4-frame send queue: 12+ frames per block are dropped, the newest
    kept, the count reported; nothing buffers without bound."""
    with TestClient(create_app(pipe, Settings(send_queue_frames=4))) as c, c.websocket_connect("/ws") as ws:
        ws.send_text(json.dumps(START))
        ws.receive_json()
        ws.send_bytes(_s16(wav))
        ws.send_text('{"type":"end"}')
        frames, messages, code = _drain(ws)
    done = messages[-1]
    indices = [f.index for f in frames]
    assert code == 1000 and done["type"] == "done" and done["frames_generated"] == 81
    assert done["dropped"] == 81 - len(frames) >= 12 * 5
    assert indices == sorted(indices) and indices[-1] == 80 and indices[0] == 0


class _SlowPipe:
    """The pipeline, with ``delay`` seconds of extra work per yielded block (slower than real time)."""

    def __init__(self, pipe, delay: float):
        self._pipe, self._delay = pipe, delay

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, *args, **kwargs):
        for frames in self._pipe.stream(*args, **kwargs):
            time.sleep(self._delay)
            yield frames


def test_stats_say_when_generation_falls_behind_real_time(pipe):
    """16 frames per 0.9 s is under 25 fps: with audio for several blocks waiting, stats say behind_realtime."""
    # sessions step in turn: a batched server would give them a pipeline of its own model, not the slow one
    with TestClient(create_app(_SlowPipe(pipe, 0.9), Settings(stats_interval=0.1, batch_sessions=False))) as c, \
            c.websocket_connect("/ws") as ws:
        ws.send_text(json.dumps(START))
        ws.receive_json()
        ws.send_bytes(_s16(load_audio(ROOT / "assets" / "example.wav")))   # 8 s at once: 10 steps ready
        stats = []
        while not any(s["behind_realtime"] for s in stats) and len(stats) < 60:
            msg = ws.receive()
            if msg.get("text"):
                stats.append(json.loads(msg["text"]))
    assert stats[-1]["behind_realtime"] and stats[-1]["fps"] < 25 and stats[-1]["backlog_s"] >= 1.28, stats[-1]
