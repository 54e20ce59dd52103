"""Analytic GPU memory of the training stages at full scale (scripts/bench_train.py).

The model is counted exactly (parameters of :class:`WanDiT` built on the meta device); everything else is
an estimate whose assumptions are returned next to the numbers:

* trainable networks (DMD: generator and critic): fp32 master weights 4 B + fp32 grads 4 B + AdamW
  m, v 8 B = 16 B/param, sharded 1/N under FSDP; the generator's EMA (fp32, 4 B/param) is sharded like
  its weights (distributed.py);
* the frozen teacher: bf16 weights, 2 B/param (sharded 1/N under FSDP);
* FSDP working set: the root unit (embeddings, all cross-attention, modulation, head, audio; the model
  computes the text K/V of every block before the blocks run, so cross-attention cannot sit in the block
  units) is unsharded during a forward, plus the largest block unit (FFN) all-gathered at a time, fp32;
* activations with gradient checkpointing (bf16 autocast): each block's input [S, dim] is saved per forward
  with grad, plus the peak of one block's recomputation (~``per_token_block_bytes`` per token);
  forwards without grad hold one block's transient activations;
* the KV cache: style anchor (1 frame) + temporal anchor (``cache.temporal_frames``), k and v per layer, bf16,
  plus the prompt's cross-attention K/V.
"""
from __future__ import annotations

import torch

from ..model import DiTConfig, WanDiT

GiB = 2 ** 30


def count_params(cfg: DiTConfig) -> dict:
    with torch.device("meta"):
        model = WanDiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    root = total - sum(p.numel() for b in model.blocks for m in (b.self_attn, b.ffn) for p in m.parameters())
    ffn_unit = sum(p.numel() for p in model.blocks[0].ffn.parameters())
    attn_unit = sum(p.numel() for p in model.blocks[0].self_attn.parameters())
    return {"total": total, "root_unit": root, "largest_unit": max(ffn_unit, attn_unit)}


def per_token_block_bytes(cfg: DiTConfig, act_bytes: int = 2) -> int:
    """Transient activation bytes per token while one block runs forward + backward (estimate)."""
    return act_bytes * (10 * cfg.dim + 2 * cfg.ffn_dim) + 4 * (6 * cfg.dim)


def dmd_memory(cfg: DiTConfig, *, height: int = 480, width: int = 832, block_frames: int = 4, window_blocks: int = 4,
               clip_blocks: int = 5, temporal_frames: int = 2, text_len: int = 512, batch: int = 1,
               backprop_steps: int = 1, cfg_passes: int = 2, world: int = 1, fsdp: bool = False,
               checkpointing: bool = True) -> dict:
    """Per-GPU memory (GiB) of the DMD stage: generator + critic (AdamW), frozen teacher, activations, cache."""
    n = count_params(cfg)
    P = n["total"]
    shard = world if fsdp else 1
    tokens_per_frame = (height // 8 // cfg.patch_size[1]) * (width // 8 // cfg.patch_size[2])
    window_tokens = window_blocks * block_frames * tokens_per_frame * batch
    clip_tokens = (1 + clip_blocks * block_frames) * tokens_per_frame * batch
    ctx_tokens = (1 + temporal_frames) * tokens_per_frame * batch
    blk = per_token_block_bytes(cfg)
    layers, dim = cfg.num_layers, cfg.dim

    def act(tokens: int, with_grad: bool, mult: int = 1, forwards: int = 1) -> float:
        """Saved activations of ``forwards`` forwards kept for one backward + the peak of one block."""
        t = tokens * mult
        if not with_grad:
            return t * blk / 2                                                      # forward only: no saved tensors
        if checkpointing:
            return forwards * layers * t * dim * 2 + t * blk
        return forwards * layers * t * blk

    out = {
        "params": P,
        "generator_states": 16 * P / shard,
        "critic_states": 16 * P / shard,
        "generator_ema": 4 * P / shard,
        "teacher_bf16": 2 * P / shard,
        "fsdp_working_set": (4 * (n["root_unit"] + n["largest_unit"]) + 4 * n["root_unit"]) if fsdp else 0,
        # generator update: the backprop_steps window forwards (attending to the cache) are kept for backward
        "act_generator_rollout": act(window_tokens, backprop_steps > 0, forwards=max(1, backprop_steps)),
        # critic flow-matching forward/backward over the clip
        "act_critic": act(clip_tokens, True),
        # the teacher's CFG forward (no grad) over the clip, cfg_passes stacked
        "act_teacher_cfg": act(clip_tokens, False, cfg_passes),
        "kv_cache": 2 * layers * ctx_tokens * dim * 2 + 2 * layers * text_len * batch * dim * 2,
    }
    # activations of the phases do not coexist: the critic update and the generator update run one after the other
    act_peak = max(out["act_generator_rollout"] + out["act_teacher_cfg"], out["act_critic"])
    static = sum(out[k] for k in ("generator_states", "critic_states", "generator_ema", "teacher_bf16", "fsdp_working_set"))
    out["activations_peak"] = act_peak
    out["total"] = static + act_peak + out["kv_cache"]
    gib = {k: (v / GiB if k != "params" else v) for k, v in out.items()}
    gib["assumptions"] = {
        "world": world, "fsdp": fsdp, "gradient_checkpointing": checkpointing, "resolution": [height, width],
        "tokens_per_frame": tokens_per_frame, "window_tokens": window_tokens, "clip_tokens": clip_tokens,
        "context_tokens": ctx_tokens, "batch_per_gpu": batch, "backprop_steps": backprop_steps,
        "cfg_passes": cfg_passes, "per_token_block_bytes": blk, "units": "GiB except params",
    }
    return gib
