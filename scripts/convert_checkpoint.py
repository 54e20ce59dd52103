#!/usr/bin/env python
"""Convert any accepted DiT checkpoint into a merged plain safetensors state dict of our model.

Accepted inputs: the released student (model.pt / ode_audio_init.pt; PEFT LoRA is merged), a saved state dict,
the original Wan2.1 safetensors (file, shards + index, or folder) and the diffusers layout.

    python scripts/convert_checkpoint.py --input AvatarForcing/model.pt --output dit.safetensors [--ema]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from avatarforcing import run_command  # noqa: E402
from avatarforcing.checkpoint import DEFAULT_LORA_ALPHA, convert_checkpoint  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="checkpoint file or folder")
    p.add_argument("--output", required=True, help="output .safetensors")
    p.add_argument("--ema", action="store_true", help="take 'generator_ema' instead of 'generator'")
    p.add_argument("--lora-alpha", type=float, default=DEFAULT_LORA_ALPHA, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: read from lora_A)")
    p.add_argument("--allow-pickle", action="store_true", help="allow non-tensor pickles (runs the file's code)")
    args = p.parse_args(argv)
    return run_command(lambda: print(convert_checkpoint(args.input, args.output, use_ema=args.ema,
                                                        lora_alpha=args.lora_alpha, lora_rank=args.lora_rank,
                                                        allow_pickle=args.allow_pickle)))


if __name__ == "__main__":
    sys.exit(main())
