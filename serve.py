"""Serve live talking avatars over WebSocket: a browser page at / and the protocol of docs/protocol.md at /ws.

    python serve.py [--config configs/x.yaml] [--checkpoint model.pt] [--host 127.0.0.1] [--port 8000]
                    [--max-sessions 4] [--idle-timeout 30] [--max-message-bytes 16777216] [--no-batch]
                    [--ray --replicas N [--gpus-per-replica 1]] [key=value ...]

One model process whose engine steps the ready sessions together, stacking their DiT forwards into one
batch (avatarforcing/live/, avatarforcing/multistream.py); with --ray, N such processes behind Ray Serve.  The default
model is the one ``python inference.py`` uses (configs/demo.yaml, else configs/tiny.yaml).  Needs the
``serve`` extra: ``pip install -e ".[serve]"``.  Errors print ``error: <message>`` and exit with status 1.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys

from avatarforcing import AvatarForcingError, run_command
from avatarforcing.config import load_config, resolve_path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line error and exit 1
        raise AvatarForcingError(f"{message} (see python serve.py --help)")


def build_parser() -> argparse.ArgumentParser:
    from avatarforcing.live.settings import Settings

    d = Settings()
    p = _Parser(description="AvatarForcing live server (WebSocket + browser page).",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help="experiment YAML (default: configs/demo.yaml, else configs/tiny.yaml)")
    p.add_argument("--checkpoint", help="DiT weights (default: inference.checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions,
                   help=f"live sessions at once; more are refused with close code 1013 (default: {d.max_sessions})")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help=f"seconds without a client message before closing with 1008 (default: {d.idle_timeout:g})")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help=f"largest client message; larger ones close with 1009 (default: {d.max_message_bytes})")
    p.add_argument("--send-queue-frames", type=int, default=d.send_queue_frames,
                   help="frames waiting per client before the oldest are dropped (default: 0 = two blocks)")
    p.add_argument("--no-batch", action="store_true",
                   help="step sessions one after another instead of stacking their DiT forwards into one batch")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help=f"how long a batched forward waits for the other ready sessions (default: {d.batch_wait_ms:g})")
    p.add_argument("--no-warmup", action="store_true", help="skip generating one block before serving")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: --replicas live servers, each holding its own sessions")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default: 1; one per GPU)")
    p.add_argument("--gpus-per-replica", type=float, default=1.0, help="GPUs per replica (default: 1; 0 on CPU)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per replica (default: 1)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. inference.device=cpu")
    return p


def check_port(host: str, port: int) -> None:
    """Fail before loading the model if the address cannot be bound."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise AvatarForcingError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host") from None


def run(args) -> None:
    try:
        import uvicorn

        from avatarforcing.live.server import LiveServer, create_app
        from avatarforcing.live.settings import Settings
    except ImportError as exc:
        raise AvatarForcingError(f"the live server needs {exc.name}; install it with pip install -e \".[serve]\"") from None
    from avatarforcing.pipeline import AvatarPipeline, default_config_path

    settings = Settings(max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                        max_message_bytes=args.max_message_bytes, send_queue_frames=args.send_queue_frames,
                        batch_sessions=not args.no_batch, batch_wait_ms=args.batch_wait_ms).check()
    config = resolve_path(args.config) if args.config else default_config_path()
    cfg = load_config(config, args.overrides)            # checked here, before anything starts
    check_port(args.host, args.port)
    if args.ray:
        from avatarforcing.live import ray_deployment

        deployment = ray_deployment.build_deployment(config, args.checkpoint, args.overrides, settings, args.replicas,
                                                     args.gpus_per_replica, args.cpus_per_replica,
                                                     warm_up=not args.no_warmup)
        print(f"serving http://{args.host}:{args.port}/ (WebSocket /ws) on {args.replicas} Ray Serve replica(s)",
              flush=True)
        ray_deployment.run(deployment, args.host, args.port)
        return
    pipe = AvatarPipeline.from_config(cfg, args.checkpoint or cfg.inference.checkpoint)
    app = create_app(pipe, settings)
    live: LiveServer = app.state.live
    if not args.no_warmup:
        live.warm_up()
    print(f"serving http://{args.host}:{args.port}/ (WebSocket /ws)", flush=True)
    # uvicorn's own limit is above ours, so oversized messages get our error message (close code 1009)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=2 * settings.max_message_bytes + (1 << 16))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_command(lambda: run(build_parser().parse_intermixed_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
