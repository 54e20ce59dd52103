"""Streaming vs offline audio features: cosine similarity per window position.

    python scripts/bench_audio_stream.py [--seconds 20] [--out results/bench_audio_stream.json]

The released weights were trained on offline features (the whole clip normalised and encoded in one
forward). A live stream can only encode the audio received so far. This measures how close the streaming
features come to the offline ones, per video frame (cosine over the feature vector), for

- ``lookahead``: the pipeline's live feed (avatarforcing.audio.LookaheadRows). Every streaming step the
  sampler asks for its whole window; the feed re-encodes it with ``audio.left_context_seconds`` of past
  audio and all audio up to the window end (+ ``audio.lookahead_seconds``). A block at window position
  ``age`` (0 = newest, L-1 = oldest, the one emitted) has age * 4B video frames of right context (+ the
  look-ahead); the features it is emitted with are those at age L-1.
- ``left-only``: the old chunked streaming encoder (``encoder.stream()``: 0.64 s chunks, left context
  only, final at once): one number, it does not change with the window position.

Audio arrives as 20 ms packets of a speech-like signal (avatarforcing.world.speech); only windows whose
right edge (+ look-ahead) lies inside the clip are scored, so the offline features always have audio on
both sides. Models: the tiny random wav2vec2 of the tests, the wav2vec2-base-960h ARCHITECTURE
(transformers.Wav2Vec2Config() defaults: 12 layers, 768 hidden) with random weights (no download is
possible here: trained weights attend differently, so the numbers are indicative), and MelFeatures
(causal: must be exactly 1).
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
import torch.nn.functional as F  # noqa: E402

from avatarforcing.audio import (AudioFeed, MelFeatures, Wav2Vec2Features,  # noqa: E402
                                 latent_audio)
from avatarforcing.units import LATENT_STRIDE  # noqa: E402
from avatarforcing.schedule import WindowSchedule  # noqa: E402
from avatarforcing.world.speech import synth_speech  # noqa: E402

PACKET = 320  # 20 ms live packets


def packets(wav: torch.Tensor):
    return (wav[i:i + PACKET] for i in range(0, len(wav), PACKET))


def summary(c: torch.Tensor) -> dict:
    return {"mean": round(c.mean().item(), 4), "min": round(c.min().item(), 4), "rows": int(c.numel())}


def lookahead_positions(encoder, wav: torch.Tensor, offline_rows: torch.Tensor, L: int, B: int,
                        lookahead: float) -> list[dict]:
    """Cosine per window position (age 0 = newest .. L-1 = oldest) of the live feed vs offline rows."""
    encoder.lookahead_seconds = lookahead
    feed = AudioFeed(encoder, packets(wav), 0)
    sched = WindowSchedule([1000.0 - 100 * i for i in range(L)], block_frames=B, window_blocks=L)
    dim = encoder.feature_dim
    audio_frames = len(wav) // encoder.samples_per_frame            # complete frames only
    look = round(lookahead * encoder.fps)
    per_age: list[list[torch.Tensor]] = [[] for _ in range(L)]
    for step in sched.plan(None):
        first, stop = 1 + step.blocks[0] * B, 1 + (step.blocks[-1] + 1) * B
        if LATENT_STRIDE * (stop - 1) + look > audio_frames:       # right edge past the clip: stop
            break
        got = feed.latent(first, stop).view(stop - first, LATENT_STRIDE, dim)    # [F, 4, D]
        want = latent_audio(offline_rows, stop)[first:].view(stop - first, LATENT_STRIDE, dim)
        cos = F.cosine_similarity(got.float(), want.float(), dim=-1)            # [F, 4]
        for i, age in enumerate(step.ages):
            per_age[age].append(cos[i * B:(i + 1) * B].reshape(-1))
    out = []
    for age in range(L):
        c = torch.cat(per_age[age])
        right = age * LATENT_STRIDE * B / encoder.fps + look / encoder.fps
        out.append({"age": age, "right_context_s": round(right, 2), **summary(c)})
    return out


def left_only(encoder, wav: torch.Tensor, offline_rows: torch.Tensor, num_rows: int) -> dict:
    """The old chunked, left-context-only stream vs offline over rows 1..num_rows-1."""
    s = encoder.stream()
    rows = torch.cat([s.push(p) for p in packets(wav)] + [s.flush()])
    return summary(F.cosine_similarity(rows[1:num_rows].float(), offline_rows[1:num_rows].float(), dim=-1))


def bench_model(encoder, wav: torch.Tensor, L: int, B: int, lookaheads: list[float]) -> dict:
    t0 = time.time()
    offline = encoder.encode(wav)                                       # [1 + frames, D]
    res = {"feature_dim": encoder.feature_dim, "left_context_s": encoder.left_context_seconds,
           "chunk_s (left-only)": encoder.chunk_seconds, "lookahead": {}}
    for la in lookaheads:
        res["lookahead"][f"{la:.2f}"] = lookahead_positions(encoder, wav, offline, L, B, la)
    newest = res["lookahead"][f"{lookaheads[0]:.2f}"][0]                 # every scored block passes age 0
    res["left_only"] = left_only(encoder, wav, offline, 1 + newest["rows"])  # the same video frames
    res["seconds_taken"] = round(time.time() - t0, 1)
    return res


def print_table(results: dict, L: int) -> None:
    heads = [f"age {a}" for a in range(L)]
    print(f"{'model':<22} {'feed':<22} " + " ".join(f"{h:>15}" for h in heads))
    for name, r in results.items():
        lo = r["left_only"]
        print(f"{name:<22} {'left-only (old)':<22} {lo['mean']:>8.4f} (all positions, min {lo['min']:.4f})")
        for la, pos in r["lookahead"].items():
            cells = " ".join(f"{p['mean']:>7.4f} ({p['right_context_s']:.2f}s)" for p in pos)
            print(f"{'':<22} {'lookahead +' + la + ' s':<22} {cells}")
            print(f"{'':<22} {'  min':<22} " + " ".join(f"{p['min']:>15.4f}" for p in pos))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lookaheads", type=float, nargs="+", default=[0.0, 0.64],
                    help="audio.lookahead_seconds values of the live feed")
    ap.add_argument("--left-context", type=float, default=2.0, help="audio.left_context_seconds (both feeds)")
    ap.add_argument("--skip-base", action="store_true", help="only the tiny wav2vec2 and MelFeatures")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_audio_stream.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    L, B = 4, 4
    wav = torch.from_numpy(synth_speech(args.seconds, args.seed).wav)

    from transformers import Wav2Vec2Config
    ctx = dict(left_context_seconds=args.left_context)
    models = {"mel (world)": lambda: MelFeatures(**ctx),
              "wav2vec2 tiny random": lambda: Wav2Vec2Features.from_config(**ctx)}
    if not args.skip_base:
        models["wav2vec2 base random"] = lambda: Wav2Vec2Features.from_config(Wav2Vec2Config(), **ctx)
    results = {}
    for name, make in models.items():
        torch.manual_seed(0)
        results[name] = bench_model(make(), wav, L, B, args.lookaheads)
        print(f"{name}: {results[name]['seconds_taken']} s", flush=True)
    print(f"\ncosine(streaming, offline) per video frame, mean over rows; window position age 0 = newest .. "
          f"{L - 1} = oldest (emitted), (right context in s); L={L} B={B}, left context {args.left_context} s, "
          f"{args.seconds:.0f} s speech-like clip")
    print_table(results, L)
    report = {"what": "cosine similarity of streaming vs offline (whole clip) audio features per video frame",
              "signal": f"avatarforcing.world.speech.synth_speech({args.seconds}, seed={args.seed}), 20 ms packets",
              "L": L, "B": B, "positions": "age 0 = newest block of the window .. L-1 = oldest (emitted)",
              "weights": "random: no download possible here; base = transformers.Wav2Vec2Config() defaults "
                         "(the wav2vec2-base-960h architecture), tiny = avatarforcing.audio.tiny_wav2vec2_config()",
              "torch_threads": 1, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
