"""Model benchmark: tiny-model window forward time/memory at several stream positions (measured, CPU),
and the analytic FLOPs and KV-cache bytes per streaming step of the 1.3B model at 480x832.

    python scripts/bench_model.py [--out results/bench_model.json] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from avatarforcing.stream_state import CacheConfig, write_temporal  # noqa: E402
from avatarforcing.model import PRESETS, DiTConfig, build_model  # noqa: E402
from avatarforcing.sampler import StreamingSampler  # noqa: E402
from avatarforcing.schedule import WindowSchedule  # noqa: E402


def dit_flops(cfg: DiTConfig, q_tokens: int, kv_tokens: int, text_tokens: int, with_head: bool = True) -> float:
    """Multiply-adds x 2 of one DiT forward over q_tokens queries attending to kv_tokens keys."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = (
        4 * 2 * q_tokens * d * d            # self-attn q, k, v, o
        + 2 * 2 * q_tokens * kv_tokens * d  # QK^T and AV
        + 2 * 2 * q_tokens * d * d          # cross-attn q, o (text K/V cached per stream)
        + 2 * 2 * q_tokens * text_tokens * d
        + 2 * 2 * q_tokens * d * f          # FFN
    )
    total = cfg.num_layers * per_layer + 2 * q_tokens * cfg.in_dim * 4 * d
    if with_head:
        total += 2 * q_tokens * d * cfg.out_dim * 4
    return float(total)


def analytic_real(height=480, width=832, B=4, L=4, temporal_frames=2, bytes_per_el=2) -> dict:
    cfg = PRESETS["wan2.1-1.3b"]
    tpf = (height // 16) * (width // 16)          # 8x VAE, 2x2 patch
    window = L * B * tpf
    ctx = (1 + temporal_frames) * tpf
    fwd = dit_flops(cfg, window, window + ctx, cfg.text_len)
    rerun = dit_flops(cfg, B * tpf, B * tpf + ctx, cfg.text_len, with_head=False)
    kv_bytes = ctx * cfg.dim * 2 * cfg.num_layers * bytes_per_el
    text_bytes = cfg.text_len * cfg.dim * 2 * cfg.num_layers * bytes_per_el
    return {
        "resolution": [height, width], "tokens_per_latent_frame": tpf, "window_tokens": window,
        "context_tokens": ctx, "window_forward_tflops": fwd / 1e12, "clean_rerun_tflops": rerun / 1e12,
        "step_tflops": (fwd + rerun) / 1e12, "video_frames_per_step": 4 * B,
        "tflops_per_video_frame": (fwd + rerun) / 1e12 / (4 * B),
        "kv_cache_bytes": kv_bytes, "kv_cache_mib": kv_bytes / 2 ** 20,
        "text_kv_mib": text_bytes / 2 ** 20,
        "note": "bf16 K/V; anchor (1 frame) + temporal (2 frames) per layer; text K/V computed once per stream",
    }


def measure_tiny(repeats: int, positions=(1, 101, 10_001), latent_hw=(8, 8)) -> dict:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    h, w = latent_hw
    sch = WindowSchedule([1000, 952.38, 769.23, 555.56], block_frames=4)
    ref = torch.randn(1, 16, 1, h, w)
    text = torch.randn(1, model.cfg.text_len, model.cfg.text_dim)
    proc = psutil.Process(os.getpid())
    rows = []
    for pos in positions:
        smp = StreamingSampler(model, sch, CacheConfig(), ref, text)
        smp.cache.next_frame = pos
        with torch.no_grad():
            write_temporal(model, smp.cache, smp.schedule, smp.ref, 0, torch.randn(1, 16, 4, h, w), None,
                           smp.noise)   # a full temporal cache
            x = torch.randn(1, 16, 16, h, w)
            t = torch.tensor([[555.56] * 4 + [769.23] * 4 + [952.38] * 4 + [1000.0] * 4])
            for _ in range(3):
                model.window(x, ref, t, None, smp.cache)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.window(x, ref, t, None, smp.cache)
                times.append((time.perf_counter() - t0) * 1e3)
        rows.append({"stream_frame": pos, "window_forward_ms_median": statistics.median(times),
                     "rss_mib": proc.memory_info().rss / 2 ** 20, "kv_cache_bytes": smp.cache.nbytes()})
    return {"latent_hw": list(latent_hw), "threads": torch.get_num_threads(), "positions": rows,
            "late_over_early_time": rows[-1]["window_forward_ms_median"] / rows[0]["window_forward_ms_median"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench_model.json")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    result = {"tiny_cpu": measure_tiny(args.repeats), "real_1.3b_analytic": analytic_real(),
              "real_1.3b_analytic_B1": analytic_real(B=1), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    tiny, real = result["tiny_cpu"], result["real_1.3b_analytic"]
    for r in tiny["positions"]:
        print(f"tiny window forward at frame {r['stream_frame']:>6}: {r['window_forward_ms_median']:.2f} ms, "
              f"cache {r['kv_cache_bytes'] / 1024:.1f} KiB, RSS {r['rss_mib']:.0f} MiB")
    print(f"late/early time ratio: {tiny['late_over_early_time']:.3f}")
    print(f"1.3B @480x832: window fwd {real['window_forward_tflops']:.1f} TFLOP + re-run {real['clean_rerun_tflops']:.1f} "
          f"TFLOP per step = {real['tflops_per_video_frame']:.2f} TFLOP per video frame; "
          f"KV cache {real['kv_cache_mib']:.0f} MiB (+ text {real['text_kv_mib']:.0f} MiB)")
    print(out)


if __name__ == "__main__":
    main()
