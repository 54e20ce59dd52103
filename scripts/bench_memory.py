"""Peak memory of the streaming student at 480x832 (B4 L4 N1, temporal cache 2 frames, bf16), per component,
in the default and the low-VRAM mode (and with fp8 weights): can the paper's model run on an 8 GB GPU?

    python scripts/bench_memory.py [--out results/bench_memory.json] [--real-vae]

Method (written into the JSON): the stream is traced op by op with avatarforcing.memtrace.MemoryTracer (live
tensor storages, 512-byte granularity) while avatarforcing.memtrace.measure_stream runs it as the pipeline
does: reference encode, text K/V + anchor prefill, then steps of audio window encode, window forward,
clean re-run and VAE decode of the emitted block, until the steady state.  The DiT, the VAE and wav2vec2
run at full size on the ``meta`` device (no data, no compute; SDPA counted as the flash kernel CUDA uses in
bf16: output + logsumexp, no S x S matrix).  Real CPU runs check the meta numbers: wav2vec2-base (random
weights) encodes its streaming window for real, the VAE decodes for real at a reduced size (``--real-vae``:
at 480x832, ~6 minutes and ~9 GB of RAM), the tiny DiT in tests/test_memtrace.py.  umT5-XXL is traced on meta
too (512 tokens) and checked against params x 2 bytes.  Offloading (low-VRAM mode) is applied to the traced
phases: a phase's peak minus the weights / caches that sit on the CPU during it.  fp8: 1 byte per weight
of the blocks' linear layers (+ one fp32 scale per row) instead of 2.

On a GPU, ``torch.cuda.max_memory_allocated`` around ``measure_stream`` on the real components is the
ground truth (scripts/gpu_check.py); the functions here take any device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from avatarforcing.attention import RotaryEmbedding  # noqa: E402

from avatarforcing.stream_state import CacheConfig  # noqa: E402
from avatarforcing.lowvram import LOW_VRAM_FFN_CHUNK, apply_memory_options  # noqa: E402
from avatarforcing.memtrace import GiB, MemoryTracer, measure_stream, tensor_bytes  # noqa: E402
from avatarforcing.model import PRESETS, WanDiT  # noqa: E402
from avatarforcing.schedule import WindowSchedule  # noqa: E402

TARGET_GIB = 8.0
HEIGHT, WIDTH = 480, 832
DIT_PHASES = ("dit.stream_start", "dit.anchor_prefill", "dit.step", "dit.window_forward", "dit.clean_rerun")
VAE_PHASES = ("vae.encode_reference", "vae.decode_reference", "vae.decode_block")
AUDIO_PHASES = ("audio.encode_window",)


def gib(x):
    if isinstance(x, dict):
        return {k: gib(v) for k, v in x.items()}
    if isinstance(x, list):
        return [gib(v) for v in x]
    return round(x / GiB, 4) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


# ----------------------------------------------------------------------------------------------
# the components at full size


def schedule() -> WindowSchedule:
    return WindowSchedule.from_config(OmegaConf.create(dict(num_train_timesteps=1000, shift=5.0, steps=[1000, 800, 400, 200],
                                                            warp=True, block_frames=4, window_blocks=None, passes=1)))


def build_components(device="meta", dtype=torch.bfloat16):
    """Wan2.1-T2V-1.3B student + Wan VAE (base_dim 96) + wav2vec2-base, random (or meta) weights, on ``device``."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from avatarforcing.audio import Wav2Vec2Features
    from avatarforcing.vae import WanVAE
    with torch.device(device):
        model = WanDiT(PRESETS["wan2.1-1.3b"])
        vae = WanVAE.from_config(OmegaConf.create({"path": None, "base_dim": 96, "z_dim": 16, "latents_mean": None,
                                                   "latents_std": None}))
        audio = Wav2Vec2Features(Wav2Vec2Model(Wav2Vec2Config()))
    model.rope = RotaryEmbedding(model.cfg.head_dim, model.cfg.rope_theta)   # its tables are computed on the host
    model = model.to(device, dtype).eval().requires_grad_(False)
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    audio.model.to(device, dtype)            # (transformers creates one parameter on the CPU even under meta)
    return model, vae, audio


def fp8_saving(model: nn.Module) -> tuple[int, int]:
    """(bytes saved by fp8 weights of the blocks' linears, transient of one dequantized weight [out, in] fp32 + bf16)."""
    lins = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    bf16 = sum(m.weight.numel() * 2 for m in lins)
    fp8 = sum(m.weight.numel() + m.out_features * 4 for m in lins)
    return bf16 - fp8, max(m.weight.numel() for m in lins) * 6


# ----------------------------------------------------------------------------------------------
# modes


def offload_adjusted(run: dict, patch_bytes: int, park_decoder_cache: bool) -> dict:
    """Phase peaks with model CPU offload: what is on the CPU during a phase is not on the GPU.

    DiT phases: the VAE weights are off (and the VAE decoder's cache once it exists, parked after each push);
    VAE phases: the DiT but its patch embedding; audio (encoded at the start of a step, after a decode):
    the DiT and the decoder cache.  wav2vec2 stays on the GPU."""
    w = run["weights"]
    cache = run["state"]["vae_decoder_cache"] if park_decoder_cache else 0
    dit_off = w["dit"] - patch_bytes
    out = {}
    for name, ph in run["phases"].items():
        if name in ("dit.stream_start", "dit.anchor_prefill"):   # before the first decode: no decoder cache yet
            off = w["vae"]
        elif name in DIT_PHASES:
            off = w["vae"] + cache
        elif name in VAE_PHASES:
            off = dit_off
        else:
            off = dit_off + cache
        out[name] = ph["peak"] - off
    return out


def summarize(run: dict, phase_peaks: dict | None = None, fp8: tuple[int, int] | None = None,
              dit_resident: tuple[str, ...] = DIT_PHASES + VAE_PHASES + AUDIO_PHASES) -> dict:
    """Peak over the phases (optionally adjusted), with fp8 weights where the DiT is resident."""
    peaks = dict(phase_peaks or {k: v["peak"] for k, v in run["phases"].items()})
    if fp8:
        saving, dequant = fp8
        peaks = {k: v - (saving if k in dit_resident else 0) + (dequant if k in DIT_PHASES else 0)
                 for k, v in peaks.items()}
    top = max(peaks, key=peaks.get)
    return {"peak_gib": gib(peaks[top]), "peak_phase": top, "phase_peaks_gib": gib(peaks)}


def run_mode(low_vram: bool, frames_per_decode: int = 1) -> tuple[dict, nn.Module]:
    """Trace one stream; ``frames_per_decode`` is ``vae.frames_per_decode`` (1 = the default, 0 = a whole block)."""
    model, vae, audio = build_components()
    vae.decode_frames_per_call = frames_per_decode
    if low_vram:
        class _Text:
            device_policy = "auto"
        apply_memory_options(model, vae, audio, _Text(), OmegaConf.create({"low_vram": True}), "meta")
    run = measure_stream(model, vae, audio, schedule(), CacheConfig(temporal_frames=2), height=HEIGHT, width=WIDTH)
    return run, model


def mode_report(run: dict, model: nn.Module, low_vram: bool) -> dict:
    patch = tensor_bytes(model.patch_embedding)
    adjusted = offload_adjusted(run, patch, park_decoder_cache=True) if low_vram else None
    fp8 = fp8_saving(model)
    dit_resident = DIT_PHASES if low_vram else DIT_PHASES + VAE_PHASES + AUDIO_PHASES
    return {
        **summarize(run, adjusted),
        "fp8": summarize(run, adjusted, fp8, dit_resident),
        "traced_peak_gib_before_offload": gib(run["peak"]),
        "weights_gib": gib(run["weights"]),
        "state_gib": gib(run["state"]),
        "phases_gib": gib({k: {kk: v[kk] for kk in ("start", "peak", "end", "transient")} for k, v in run["phases"].items()}),
        "steps_gib": gib([{k: s[k] for k in ("start", "peak", "end")} for s in run["steps"]]),
        "steady_state_reached": run["steady"],
    }


# ----------------------------------------------------------------------------------------------
# components measured alone


def umt5_xxl() -> dict:
    """umT5-XXL encoder (the ~11 GB text encoder): traced on meta with 512 tokens, and params x 2 bytes."""
    from transformers import UMT5Config, UMT5EncoderModel
    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    with torch.device("meta"):
        enc = UMT5EncoderModel(cfg)
    enc = enc.to(torch.bfloat16).eval()
    params = sum(p.numel() for p in enc.parameters())
    tracer = MemoryTracer(devices=("meta",)).track(enc)
    ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    with tracer, torch.no_grad(), tracer.section("encode") as sec:
        enc(input_ids=ids).last_hidden_state                   # all 512 tokens real (no padding mask)
    return {"params": params, "weights_gib": gib(tensor_bytes(enc)), "analytic_weights_gib": gib(params * 2),
            "encode_512_tokens_peak_gib": gib(sec["peak"]), "activations_512_tokens_gib": gib(sec["peak"] - sec["start"]),
            "note": "loaded only for prompts missing from the caches and freed after encoding (text.keep_loaded: "
                    "false): not part of the stream peak; default text.device=auto puts it on the GPU when it fits, "
                    "low_vram on the CPU (bf16, ~11 GB of RAM)"}


def wav2vec2_real(window_s: float = 4.56, offline_s=(10.0, 60.0)) -> dict:
    """wav2vec2-base, random weights, bf16: weights + encoding the streaming window, for real on the CPU and on
    meta; whole clips (the offline mode encodes a file in one forward) on meta."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from avatarforcing.audio import Wav2Vec2Features

    def encode(device: str, seconds: float) -> tuple[int, int, float]:
        torch.manual_seed(0)
        enc = Wav2Vec2Features(Wav2Vec2Model(Wav2Vec2Config()))
        enc.model.to(device, torch.bfloat16)
        tracer = MemoryTracer(devices=(device,)).track(enc)
        wav = torch.randn(int(seconds * 16000)) * 0.1
        t0 = time.perf_counter()
        with tracer, tracer.section("encode") as sec:
            enc.window_features(wav, enc.num_audio_frames(len(wav)))
        return tensor_bytes(enc), sec["peak"], time.perf_counter() - t0

    weights, cpu_peak, cpu_s = encode("cpu", window_s)
    _, meta_peak, _ = encode("meta", window_s)
    out = {"weights_gib": gib(weights), f"encode_{window_s:g}s_peak_gib": gib(meta_peak),
           f"encode_{window_s:g}s_cpu_peak_gib": gib(cpu_peak), "cpu_seconds": round(cpu_s, 1),
           "cpu_minus_meta_bytes": cpu_peak - meta_peak}
    for s in offline_s:
        out[f"encode_{s:g}s_offline_peak_gib"] = gib(encode("meta", s)[1])
    out["note"] = (f"{window_s:g} s = the streaming encoder's window of a live stream (2 s left context + the 2.56 s window); the offline "
                   "mode (audio.file_features: offline) encodes a whole file in one forward at the stream's start. "
                   "The CPU run also counts the host-side normalisation of the waveform (cpu_minus_meta_bytes), "
                   "which stays in host memory on a GPU")
    return out


def vae_real(height: int, width: int) -> dict:
    """VAE decode (reference frame + one latent frame, the low-VRAM unit) for real on the CPU (fp32) vs meta."""
    from avatarforcing.vae import WanVAE
    res = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            vae = WanVAE.from_config(OmegaConf.create({"path": None, "base_dim": 96, "z_dim": 16, "latents_mean": None,
                                                       "latents_std": None}))
        tracer = MemoryTracer(devices=(device,)).track(vae)
        t0 = time.perf_counter()
        with tracer, torch.no_grad():
            dec = vae.stream_decoder(frames_per_call=1)
            for name in ("reference", "frame"):
                with tracer.section(name):
                    dec.push(torch.randn(1, 16, 1, height // 8, width // 8, device=device))
        res[device] = {"sections": dict(tracer.sections), "peak": tracer.peak_bytes,
                       "seconds": round(time.perf_counter() - t0, 1)}
    return {"size": [height, width], "dtype": "fp32", "peak_gib": gib(res["cpu"]["peak"]),
            "sections_gib": gib(res["cpu"]["sections"]), "cpu_seconds": res["cpu"]["seconds"],
            "meta_equals_cpu": res["cpu"]["sections"] == res["meta"]["sections"] and res["cpu"]["peak"] == res["meta"]["peak"]}


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_memory.json"))
    ap.add_argument("--real-vae", action="store_true", help="check the VAE for real at 480x832 (slow: ~6 min, ~9 GB RAM)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    print("tracing the default mode ...", flush=True)
    default_run, model = run_mode(False)
    default = mode_report(default_run, model, low_vram=False)
    print("tracing the default mode with whole-block decoding (vae.frames_per_decode=0) ...", flush=True)
    block_run, model = run_mode(False, frames_per_decode=0)
    block = mode_report(block_run, model, low_vram=False)
    print("tracing the low-VRAM mode ...", flush=True)
    low_run, model = run_mode(True)
    low = mode_report(low_run, model, low_vram=True)
    print("umT5-XXL, wav2vec2, VAE checks ...", flush=True)
    text = umt5_xxl()
    audio = wav2vec2_real()
    vae_check = vae_real(HEIGHT, WIDTH) if args.real_vae else vae_real(HEIGHT // 4, WIDTH // 4)

    w = default_run["weights"]
    st = default_run["state"]
    ph, lph = default_run["phases"], low_run["phases"]
    resident = w["dit"] + w["vae"] + w["audio"]
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    report = {
        "stream_peak_gib": default["peak_gib"],
        "low_vram_stream_peak_gib": low["peak_gib"],
        "target_gib": TARGET_GIB,
        "fits_target": {"default": default["peak_gib"] <= TARGET_GIB, "low_vram": low["peak_gib"] <= TARGET_GIB,
                        "low_vram_fp8": low["fp8"]["peak_gib"] <= TARGET_GIB},
        "config": {"model": "Wan2.1-T2V-1.3B student + audio (random weights)", "resolution": [HEIGHT, WIDTH],
                   "latent": [HEIGHT // 8, WIDTH // 8], "tokens_per_latent_frame": tokens, "B": 4, "L": 4, "N": 1,
                   "window_tokens": 16 * tokens, "temporal_cache_frames": 2, "batch": 1, "dtype": "bf16",
                   "text_len": 512, "vae": "Wan2.1 VAE, base_dim 96", "audio": "wav2vec2-base, live window 4.56 s (2 s left context + 2.56 s window)"},
        "modes": {
            "default": {**default, "options": "none (vae.frames_per_decode=1: one latent frame per decoder call)"},
            "block_decode": {**block, "options": "vae.frames_per_decode=0: a whole block per decoder call"},
            "low_vram": {**low, "options": f"FFN in {LOW_VRAM_FFN_CHUNK}-token chunks, VAE one latent frame per call with its "
                                           "cache parked on the CPU between blocks, umT5 on the CPU, offload=model "
                                           "(DiT and VAE take turns on the GPU)"},
        },
        "components": {
            "dit": {"params": sum(p.numel() for p in model.parameters()), "weights_gib": gib(w["dit"]),
                    "weights_fp8_gib": gib(w["dit"] - fp8_saving(model)[0]),
                    "kv_cache_gib": gib(st["kv_cache_nominal"]), "kv_cache_storage_gib": gib(st["kv_cache"]),
                    "text_kv_gib": gib(st["text_kv"]), "rotated_context_memo_gib": gib(st["rotated_context"]),
                    "rope_tables_gib": gib(st["rope_tables"]),
                    "window_forward_transient_gib": gib(ph["dit.window_forward"]["transient"]),
                    "window_forward_transient_low_vram_gib": gib(lph["dit.window_forward"]["transient"]),
                    "clean_rerun_transient_gib": gib(ph["dit.clean_rerun"]["transient"]),
                    "anchor_prefill_transient_gib": gib(ph["dit.anchor_prefill"]["transient"])},
            "vae": {"weights_gib": gib(w["vae"]), "decoder_cache_gib": gib(st["vae_decoder_cache"]),
                    "decode_block_transient_gib": gib(block_run["phases"]["vae.decode_block"]["transient"]),
                    "decode_one_frame_transient_gib": gib(ph["vae.decode_block"]["transient"]),
                    "encode_reference_transient_gib": gib(ph["vae.encode_reference"]["transient"]),
                    "real_cpu_check": vae_check},
            "wav2vec2": {**audio, "encode_window_in_stream_transient_gib": gib(ph["audio.encode_window"]["transient"])},
            "umt5_xxl": text,
        },
        "startup_peak_gib": {
            "default_text_on_gpu": gib(resident + text["encode_512_tokens_peak_gib"] * GiB),
            "low_vram_text_on_cpu": 0.0,
            "note": "while the prompt is encoded (once per new prompt; the prompt cache skips it): the resident "
                    "DiT + VAE + wav2vec2 plus umT5-XXL with 512 tokens; in low-VRAM mode umT5 runs on the CPU and "
                    "the other components wait on the CPU (offload)"},
        "findings": findings(default, block, low, st),
        "method": {
            "tracer": "avatarforcing.memtrace.MemoryTracer: a TorchDispatchMode counting live tensor storages (views "
                      "share one) from the op that creates them until they are freed, rounded to 512 B (CUDA's "
                      "caching allocator); peak = largest live total right after any op",
            "stream": "avatarforcing.memtrace.measure_stream: the pipeline's order of work, random inputs, until "
                      "two consecutive steps trace the same (steady state)",
            "devices": "DiT, VAE, wav2vec2 at full size on the meta device (no data): exact for the same ops on a "
                       "GPU; real CPU runs equal the meta numbers (tests/test_memtrace.py for the DiT and the "
                       "whole stream at tiny size, wav2vec2 here, the VAE here at reduced size or --real-vae)",
            "attention": "SDPA counted as the flash / memory-efficient kernel CUDA uses in bf16: output + fp32 "
                         "logsumexp [B, H, S_q]; no S_q x S_k matrix",
            "offload": "low-VRAM phases: the traced peak minus the weights / decoder cache sitting on the CPU in "
                       "that phase (the hooks move whole components before a phase starts)",
            "fp8": "blocks' linear weights 1 B/param + fp32 scale per row, + one dequantized weight transient in "
                   "DiT phases (fp32 + bf16 copy of the largest linear)",
            "not_counted": "CUDA context (~0.3-0.5 GiB outside PyTorch's allocator), cuBLAS / cuDNN workspaces, "
                           "allocator fragmentation (max_memory_reserved >= max_memory_allocated), host memory",
            "ground_truth": "on CUDA torch.cuda.max_memory_allocated around measure_stream on real components "
                            "(scripts/gpu_check.py)",
        },
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(out)
    return 0


def findings(default: dict, block: dict, low: dict, st: dict) -> list[str]:
    return [
        f"default mode peaks at {default['peak_gib']:.2f} GiB in {default['peak_phase']} (fp8 weights: "
        f"{default['fp8']['peak_gib']:.2f} GiB)",
        f"decoding a whole block (16 video frames at 480x832) per VAE call instead of one latent frame would peak at "
        f"{block['peak_gib']:.2f} GiB ({block['peak_phase']}); the video is the same",
        f"low-VRAM mode: {low['peak_gib']:.2f} GiB ({low['peak_phase']}); with fp8 weights {low['fp8']['peak_gib']:.2f} GiB",
        f"the K/V cache holds {st['kv_cache'] / GiB:.2f} GiB of storage for {st['kv_cache_nominal'] / GiB:.2f} GiB of "
        "anchor + 2 temporal frames; the RoPE-rotated copy of that context, shared by the window pass and the clean "
        "re-run of a step, is dropped whenever the cache changes (it is part of the window forward's transient)",
    ]


def table(r: dict) -> str:
    m, c = r["modes"], r["components"]
    rows = [f"stream peak @480x832 B4 L4 N1 bf16: default {r['stream_peak_gib']:.2f} GiB "
            f"({m['default']['peak_phase']}), fp8 {m['default']['fp8']['peak_gib']:.2f}",
            f"                                   low-VRAM {r['low_vram_stream_peak_gib']:.2f} GiB "
            f"({m['low_vram']['peak_phase']}), fp8 {m['low_vram']['fp8']['peak_gib']:.2f}",
            f"  whole-block VAE decode (vae.frames_per_decode=0): {m['block_decode']['peak_gib']:.2f} GiB",
            f"DiT: weights {c['dit']['weights_gib']:.2f} (fp8 {c['dit']['weights_fp8_gib']:.2f}), KV {c['dit']['kv_cache_gib']:.2f} "
            f"(storage {c['dit']['kv_cache_storage_gib']:.2f}), text K/V {c['dit']['text_kv_gib']:.2f}, rotated memo "
            f"{c['dit']['rotated_context_memo_gib']:.2f}, window fwd +{c['dit']['window_forward_transient_gib']:.2f} "
            f"(low {c['dit']['window_forward_transient_low_vram_gib']:.2f}), re-run +{c['dit']['clean_rerun_transient_gib']:.2f}",
            f"VAE: weights {c['vae']['weights_gib']:.2f}, decoder cache {c['vae']['decoder_cache_gib']:.2f}, block decode "
            f"+{c['vae']['decode_block_transient_gib']:.2f}, one frame +{c['vae']['decode_one_frame_transient_gib']:.2f}",
            f"wav2vec2: weights {c['wav2vec2']['weights_gib']:.3f}, 4.56 s live window peak {c['wav2vec2']['encode_4.56s_peak_gib']:.3f}"
            f", offline 60 s clip {c['wav2vec2']['encode_60s_offline_peak_gib']:.3f}",
            f"umT5-XXL: {c['umt5_xxl']['weights_gib']:.2f} GiB + {c['umt5_xxl']['activations_512_tokens_gib']:.3f} GiB for 512 tokens",
            f"wall {r['wall_s']:.0f} s"]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
