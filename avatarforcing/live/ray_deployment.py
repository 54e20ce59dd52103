"""Scale-out on Ray Serve: one replica per GPU, each a whole live server (model, engine, sessions).

    python serve.py --ray --replicas 4                  # one replica per GPU (num_gpus=1 each)
    python serve.py --ray --replicas 2 --gpus-per-replica 0 inference.device=cpu     # CPU test

Every replica builds the pipeline from the same config and serves the FastAPI app of
:func:`avatarforcing.live.server.create_app` (the page, ``/api/info`` and the WebSocket ``/ws``) behind Ray
Serve's HTTP proxy.  A WebSocket connection is one ASGI call, which the proxy routes to one replica for its
whole life, so a session's state (audio buffer, KV cache, VAE decoder cache) stays on the replica that holds
it; the ``ready`` message names that replica's process (``server``).  New connections go to a replica with fewer
than ``--max-sessions`` ongoing sessions (Ray Serve's router, ``max_ongoing_requests``); when every replica is
full they wait in the proxy's queue.

Needs the ``ray`` extra: ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

import os
import signal
import sys

from .. import AvatarForcingError
from .settings import Settings

PROXY_CHECK_TIMEOUT_S = 60          # Serve's proxy ready / health-check limit for a local instance (run())


def build_deployment(config, checkpoint=None, overrides=(), settings: Settings | None = None, replicas: int = 1,
                     gpus_per_replica: float = 1.0, cpus_per_replica: float = 1.0, warm_up: bool = True):
    """The Ray Serve deployment (unbound) of ``replicas`` live servers built from ``config`` + ``overrides``."""
    try:
        from ray import serve
    except ImportError:
        raise AvatarForcingError('Ray Serve is not installed; install it with pip install -e ".[ray]"') from None
    settings = (settings or Settings()).check()
    if replicas < 1 or gpus_per_replica < 0 or cpus_per_replica < 0:
        raise AvatarForcingError(f"--replicas must be >= 1 and --gpus-per-replica / --cpus-per-replica >= 0, got "
                                 f"{replicas}, {gpus_per_replica}, {cpus_per_replica}")
    config, overrides = str(config), list(overrides)

    def build_app():                    # runs on each replica
        from ..config import load_config
        from ..pipeline import AvatarPipeline
        from .server import create_app

        cfg = load_config(config, overrides)
        app = create_app(AvatarPipeline.from_config(cfg, checkpoint or cfg.inference.checkpoint), settings)
        if warm_up:
            app.state.live.warm_up()
        return app

    options = {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica}
    # A live session is one ongoing request for its whole life: capping them at --max-sessions makes the router
    # send a new session to a replica with a free slot (short page / info requests wait for one too).
    return serve.deployment(name="AvatarForcingLive", num_replicas=replicas, ray_actor_options=options,
                            max_ongoing_requests=settings.max_sessions)(serve.ingress(build_app)())


def relax_proxy_checks() -> None:
    """Serve's proxy must pass its ready and health checks within 5 and 10 s by default; on a busy CPU machine (the
    replicas loading their models on the same cores) it fails three in a row and is killed before it ever serves.
    A local Ray instance inherits these limits from this process; a value already set (yours) is kept."""
    for key in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(key, str(PROXY_CHECK_TIMEOUT_S))


def run(deployment, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True) -> None:
    """Start Ray (a local instance unless ``RAY_ADDRESS`` names a cluster), Serve's proxy on host:port, and the
    deployment at ``/``; with ``blocking`` serve until interrupted (Ctrl-C or SIGTERM), then shut Serve and the
    local Ray instance down, replicas included."""
    relax_proxy_checks()
    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    if not blocking:
        serve.run(deployment.bind(), route_prefix="/", blocking=False)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))    # let `finally` stop the replicas
    try:
        serve.run(deployment.bind(), route_prefix="/", blocking=True)
    finally:
        shutdown()


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
