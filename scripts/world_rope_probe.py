"""How much does a student's attention depend on where its temporal cache sits?  A probe of the wrong-RoPE control.

    python scripts/world_rope_probe.py --config configs/world/anchor_student.yaml \
        --out results/world_anchor/rope_probe.json [--cases 2] [--seconds 10] [--offsets 1,4,16,64,-64,1000,-1000]

The student streams held-out cases as it is (world seed 10,000).  At every self-attention call that reads the
cache (the window's passes and the clean re-run), the attention of the call's queries is computed twice: over the
keys as they are, and with the temporal cache's keys rotated ``offset`` latent frames further, which is what the
wrong-RoPE control (``avatarforcing/world/controls.py``, +64) does to every call.  The rollout itself is not
changed, so each offset is measured on the same queries and keys.  Per offset, averaged over calls, layers, heads
and queries:

  tv              total-variation distance between the two attention distributions (0: the offset changes
                  nothing; 1: disjoint)
  cache_share     attention mass on the temporal cache, as it is and after the offset
  anchor_share    the same for the style anchor

A student that reads its cache by content, with little use of where it sits, has a small ``tv`` and a
``cache_share`` that hardly moves.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from avatarforcing import AvatarForcingError, model as model_module  # noqa: E402
from avatarforcing.attention import apply_rope  # noqa: E402
from avatarforcing.stream_state import StreamCache  # noqa: E402

OFFSETS = (1, 4, 16, 64, -64, 1000, -1000)


class Probe:
    """Wraps the model's attention: for each call with cache context, the attention statistics under each offset."""

    def __init__(self, rope, offsets):
        self.rope, self.offsets = rope, [int(o) for o in offsets]
        self.layout = None                   # (anchor frames, temporal frames) of the current context
        self.sums = {o: {"tv": 0.0, "cache_share": 0.0, "cache_share_offset": 0.0, "anchor_share": 0.0,
                         "anchor_share_offset": 0.0} for o in self.offsets}
        self.calls = 0

    def record(self, q, k, mask):
        anchor_frames, temporal_frames = self.layout
        ctx_tokens = k.shape[1] - q.shape[1]
        tokens = ctx_tokens // (anchor_frames + temporal_frames)             # per frame
        a, t = anchor_frames * tokens, temporal_frames * tokens              # [anchor | temporal | own keys]
        scale = 1.0 / math.sqrt(q.shape[-1])
        qf, kf = q.float().transpose(1, 2), k.float().transpose(1, 2)        # [B, H, S, D]

        def weights(keys):
            logits = qf @ keys.transpose(-1, -2) * scale
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            return logits.softmax(-1)

        base = weights(kf)
        self.calls += 1
        for o in self.offsets:
            cos, sin = self.rope(torch.tensor([o]), 1, 1, k.device)          # a frame shift only: h = w = 0 angles
            shifted = k.clone()
            shifted[:, a:a + t] = apply_rope(k[:, a:a + t], cos.expand(t, -1), sin.expand(t, -1))
            w = weights(shifted.float().transpose(1, 2))
            s = self.sums[o]
            s["tv"] += 0.5 * (w - base).abs().sum(-1).mean().item()
            s["cache_share"] += base[..., a:a + t].sum(-1).mean().item()
            s["cache_share_offset"] += w[..., a:a + t].sum(-1).mean().item()
            s["anchor_share"] += base[..., :a].sum(-1).mean().item()
            s["anchor_share_offset"] += w[..., :a].sum(-1).mean().item()

    def results(self) -> dict:
        return {str(o): {k: v / max(1, self.calls) for k, v in s.items()} for o, s in self.sums.items()}


def probe_student(config: str, checkpoint, cases, offsets, seed: int = 0) -> dict:
    from unittest import mock

    from avatarforcing.ablations import resolve_config
    from avatarforcing.pipeline import AvatarPipeline

    pipe = AvatarPipeline.from_config(resolve_config(config), checkpoint)
    probe = Probe(pipe.model.rope, offsets)
    context, attention = StreamCache.context, model_module.attention
    self_attention = model_module.WanSelfAttention.forward       # the text cross-attention has its own forward
    reading_cache = [False]                                       # inside a self-attention call with cache context

    def recording_context(self):
        kv, pos = context(self)
        anchor = int(self.anchor is not None and self.cfg.style_anchor)
        probe.layout = (anchor, len(pos) - anchor)
        return kv, pos

    def recording_self_attention(self, x, rope, ctx=None, mask=None):
        reading_cache[0] = ctx is not None
        try:
            return self_attention(self, x, rope, ctx, mask)
        finally:
            reading_cache[0] = False

    def recording_attention(q, k, v, mask=None):
        if reading_cache[0] and probe.layout is not None and probe.layout[1] > 0:
            probe.record(q, k, mask)
        return attention(q, k, v, mask)

    with mock.patch.object(StreamCache, "context", recording_context), \
            mock.patch.object(model_module.WanSelfAttention, "forward", recording_self_attention), \
            mock.patch.object(model_module, "attention", recording_attention), torch.no_grad():
        for case in cases:
            probe.layout = None
            for _ in pipe.stream(case.reference, case.wav, prompt="", seed=seed):
                pass
    return {"calls": probe.calls, "offsets": probe.results()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/world/anchor_student.yaml")
    ap.add_argument("--checkpoint", default=None, help="default: the config's inference.checkpoint")
    ap.add_argument("--out", default="results/world_anchor/rope_probe.json")
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--offsets", default=",".join(map(str, OFFSETS)), help="latent frames, comma-separated")
    ap.add_argument("--cache-dir", default="runs/controls/cases", help="held-out cases, reused between runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        offsets = [int(o) for o in args.offsets.split(",")]
    except ValueError:
        print(f"error: --offsets takes integers, comma-separated; got '{args.offsets}'", file=sys.stderr)
        return 1
    try:
        if args.cases < 1 or args.seconds <= 0:
            raise AvatarForcingError("--cases must be >= 1 and --seconds > 0")
        from avatarforcing.config import load_config
        from avatarforcing.world.evaluate import held_out_cases, world_version
        torch.set_num_threads(args.threads)
        cfg = load_config(args.config)
        cases = held_out_cases(args.cases, args.seconds, size=int(cfg.inference.height), version=world_version(cfg),
                               cache_dir=args.cache_dir)
        result = probe_student(args.config, args.checkpoint, cases, offsets)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = {"config": args.config, "checkpoint": args.checkpoint, "cases": args.cases, "seconds": args.seconds,
              **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.config}: {result['calls']} attention calls with a temporal cache")
    print(f"{'offset':>7s} {'TV':>7s} {'cache share':>20s} {'anchor share':>20s}")
    for o, s in result["offsets"].items():
        print(f"{o:>7s} {s['tv']:7.4f} {s['cache_share']:9.4f} -> {s['cache_share_offset']:7.4f} "
              f"{s['anchor_share']:9.4f} -> {s['anchor_share_offset']:7.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
