"""Stream a wav to a live server (python serve.py) and record the avatar it sends back into an mp4.

    python scripts/live_client.py --server http://127.0.0.1:8000 --image face.png --audio speech.wav \\
        --output live.mp4 [--pace 1] [--prompt "..."] [--seed N]

The audio is sent at ``--pace`` times real time (1: as a microphone would, 0: as fast as possible) in
``--chunk-ms`` chunks of 16 kHz pcm_s16le; the frames and their audio are written as they arrive (a
dropped frame repeats the previous one, with silence, so the mp4 keeps its timing).  The last stdout line
is one JSON object: frames, fps (frames received per second), first_frame_latency_s (start message ->
frame 0), first_block_latency_s (first audio -> frame 1), delay_mean_s / delay_p95_s (a frame's arrival
minus the time the audio at its pts was sent), dropped, behind_realtime, output.
Errors print ``error: <message>`` and exit with status 1; no partial mp4 is left behind.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from avatarforcing import AvatarForcingError, run_command  # noqa: E402
from avatarforcing.live import protocol as P  # noqa: E402
from avatarforcing.media import VideoWriter, load_audio  # noqa: E402

RATE = P.OUTPUT_SAMPLE_RATE


class Sender(threading.Thread):
    """Sends the audio at ``pace`` x real time, then {"type":"end"}; logs when each sample was sent."""

    def __init__(self, ws, wav: np.ndarray, chunk: int, pace: float):
        super().__init__(daemon=True)
        self.ws, self.wav, self.chunk, self.pace = ws, wav, chunk, pace
        self.ends: list[int] = []       # cumulative samples after each chunk
        self.times: list[float] = []    # ... and when that chunk was sent
        self.end_time: float | None = None
        self.error: Exception | None = None

    def run(self):
        pcm = np.clip(np.round(self.wav * 32768.0), -32768, 32767).astype("<i2")
        t0 = time.monotonic()
        try:
            for start in range(0, len(pcm), self.chunk):
                end = min(start + self.chunk, len(pcm))
                if self.pace > 0:      # a chunk is sent once it has been "recorded"
                    time.sleep(max(0.0, t0 + end / RATE / self.pace - time.monotonic()))
                self.ws.send(pcm[start:end].tobytes())
                self.ends.append(end)
                self.times.append(time.monotonic())
            self.ws.send(json.dumps({"type": "end"}))
            self.end_time = time.monotonic()
        except Exception as exc:        # the connection closed (the receiver reports why)
            self.error = exc

    def sent_at(self, pts: float) -> float | None:
        """When the audio at ``pts`` seconds was sent (the end message's time past the audio)."""
        i = bisect.bisect_right(self.ends, int(pts * RATE))
        return self.times[i] if i < len(self.times) else self.end_time


class Recorder:
    """Frames + their audio -> an mp4, in index order; missing indices repeat the last frame with silence."""

    def __init__(self, output: Path, fps: int, tmp: Path):
        import soundfile as sf

        self.wav_path = tmp / "audio.wav"
        self.audio = sf.SoundFile(str(self.wav_path), "w", samplerate=RATE, channels=1, subtype="PCM_16")
        self.video = VideoWriter(output, fps, audio_path=self.wav_path)
        self.next, self.last, self.holes = 0, None, 0

    def add(self, frame: P.FrameMessage) -> None:
        import io

        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(frame.jpeg)).convert("RGB"))
        while self.last is not None and self.next < frame.index:         # dropped frames
            self._write(self.last, np.zeros_like(frame.pcm))
            self.holes += 1
        self._write(image, frame.pcm)
        self.last = image

    def _write(self, image: np.ndarray, pcm: np.ndarray) -> None:
        self.video.write(image)
        self.audio.write(pcm)
        self.next += 1

    def close(self, success: bool) -> None:
        self.audio.close()
        self.video.close(success=success and self.next > 0)


def run(args) -> dict:
    from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException
    from websockets.sync.client import connect

    if args.image != "example" and not Path(args.image).is_file():
        raise AvatarForcingError(f"image file not found: {args.image}; pass an existing .png/.jpg or 'example'")
    image = "example" if args.image == "example" else base64.b64encode(Path(args.image).read_bytes()).decode()
    wav = load_audio(args.audio, RATE)
    url = args.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1).rstrip("/") + "/ws"
    start = {"type": "start", "image": image, "prompt": args.prompt, "seed": args.seed,
             "sample_rate": RATE, "format": "pcm_s16le", "channels": 1}
    try:
        ws = connect(url, max_size=None, open_timeout=args.timeout)
    except (OSError, InvalidURI, WebSocketException) as exc:
        raise AvatarForcingError(f"cannot connect to {url} ({exc}); is `python serve.py` running there?") from None
    received, stats, done = [], [], None
    with ws, tempfile.TemporaryDirectory() as tmp:
        t_start = time.monotonic()
        ws.send(json.dumps(start))
        ready = _json(ws.recv(args.timeout))
        recorder = Recorder(Path(args.output), int(ready["fps"]), Path(tmp))
        sender = Sender(ws, wav, max(1, round(args.chunk_ms * RATE / 1000)), args.pace)
        sender.start()
        try:
            while done is None:
                msg = ws.recv(args.timeout)
                if isinstance(msg, bytes):
                    frame = P.unpack_frame(msg)
                    received.append((frame.index, frame.pts, time.monotonic()))
                    recorder.add(frame)
                    continue
                msg = _json(msg)
                if msg["type"] == "stats":
                    stats.append(msg)
                elif msg["type"] == "done":
                    done = msg
        except TimeoutError:
            recorder.close(False)
            raise AvatarForcingError(f"no message from the server for {args.timeout:g} s; is it overloaded?") from None
        except ConnectionClosed as exc:
            recorder.close(False)
            raise AvatarForcingError(f"the server closed the connection ({exc}) before the stream was done") from None
        except AvatarForcingError:
            recorder.close(False)
            raise
        recorder.close(True)
        sender.join()
    return {**_report(received, stats, done, sender, t_start, recorder.next, args.output), "server": ready.get("server")}


def _json(text) -> dict:
    msg = json.loads(text)
    if msg.get("type") == "error":
        raise AvatarForcingError(f"server: {msg['message']}")
    return msg


def _report(received, stats, done, sender, t_start, frames, output) -> dict:
    times = [t for _, _, t in received]
    delays = [t - sender.sent_at(pts) for i, pts, t in received if i >= 1 and sender.sent_at(pts) is not None]
    first_block = next((t for i, _, t in received if i >= 1), None)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "frames": frames, "received": len(received),
        "fps": round((len(times) - 1) / span, 2) if span > 0 else 0.0,
        "first_frame_latency_s": round(times[0] - t_start, 4) if times else None,
        "first_block_latency_s": round(first_block - sender.times[0], 4) if first_block and sender.times else None,
        "delay_mean_s": round(float(np.mean(delays)), 4) if delays else None,
        "delay_p95_s": round(float(np.percentile(delays, 95)), 4) if delays else None,
        "dropped": int(done.get("dropped", 0)),
        "behind_realtime": any(s.get("behind_realtime") for s in stats + [done]),
        "output": str(output),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the server's address (default: %(default)s)")
    p.add_argument("--image", default="example", help="reference image, or 'example' (the server's; default)")
    p.add_argument("--audio", default=str(Path(__file__).resolve().parent.parent / "assets" / "example.wav"),
                   help="speech audio, any format media.load_audio reads (default: assets/example.wav)")
    p.add_argument("--output", default="outputs/live.mp4", help="mp4 to write (default: %(default)s)")
    p.add_argument("--prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pace", type=float, default=1.0, help="audio speed vs real time; 0 = as fast as possible")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="audio per message in ms (default: 20)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default: 60)")
    return p


def main(argv=None) -> int:
    def command():
        args = build_parser().parse_args(argv)
        if args.pace < 0 or args.chunk_ms <= 0:
            raise AvatarForcingError("--pace must be >= 0 and --chunk-ms positive")
        print(json.dumps(run(args)), flush=True)
    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
