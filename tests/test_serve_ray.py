"""Scale-out on Ray Serve, on CPU: 2 replicas of the live server, 4 concurrent clients."""
import os
import threading
from pathlib import Path

import pytest

from avatarforcing.live.launch import running_server
from helpers import load_script
from live_server import example_wav

pytest.importorskip("ray.serve", reason='Ray Serve is an optional extra: pip install -e ".[ray]"')


def _live_client():
    return load_script("live_client")


def test_proxy_checks_are_relaxed_unless_set(monkeypatch):
    """Serve's proxy gets PROXY_CHECK_TIMEOUT_S for its ready / health checks (5 / 10 s by default kill it on a busy
    CPU machine before it serves); a limit the user set is kept."""
    from avatarforcing.live import ray_deployment
    monkeypatch.delenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "7")
    ray_deployment.relax_proxy_checks()
    assert os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == str(ray_deployment.PROXY_CHECK_TIMEOUT_S)
    assert os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] == "7"


def test_two_replicas_serve_four_concurrent_clients(tmp_path):
    client = _live_client()
    audio = example_wav(tmp_path / "speech.wav", seconds=2.0)
    reports, errors = {}, []

    def one(i, url):
        try:
            args = client.build_parser().parse_args(["--server", url, "--audio", str(audio), "--seed", str(i),
                                                     "--output", str(tmp_path / f"live{i}.mp4"), "--pace", "1",
                                                     "--timeout", "120"])
            reports[i] = client.run(args)
        except BaseException as exc:   # noqa: BLE001 (asserted below)
            errors.append(exc)

    with running_server("--ray", "--replicas", "2", "--gpus-per-replica", "0", "--cpus-per-replica", "0.5",
                        "--max-sessions", "2", "--no-warmup", timeout=240) as url:
        threads = [threading.Thread(target=one, args=(i, url)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
    assert not errors, errors
    assert sorted(reports) == [0, 1, 2, 3]
    for r in reports.values():                       # 2 s = 50 frames of audio: the reference + 4 blocks of 16
        assert r["frames"] == r["received"] == 65 and r["dropped"] == 0
        assert (tmp_path / Path(r["output"]).name).is_file()
    servers = {r["server"] for r in reports.values()}
    print(f"sessions per replica: { {s: sum(r['server'] == s for r in reports.values()) for s in servers} }")
    assert len(servers) == 2                         # both replicas held sessions
