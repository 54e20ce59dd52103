"""The dtype users run: bf16 end to end (DiT, VAE, audio encoder), against fp32 with the same weights.

Tolerances (measured on this CPU with the same seeds, then given ~3x margin):
- demo pipeline (trained world student + codec), 3 blocks: latents rel. error 0.28-0.65 %, frames 53.1 dB
  PSNR (max pixel difference 2) -> asserted: rel. error < 2 %, PSNR > 40 dB;
- tiny config with random weights: rel. error 0.23-0.49 %, 46.6 dB -> < 2 %, > 35 dB;
- "mid" config (the real 1.3B widths, 2 layers, 4x4 latents): rel. error 0.45-0.50 % -> < 2 %.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.stream_state import CacheConfig, NoiseSource
from avatarforcing.config import load_config
from avatarforcing.media import load_audio
from avatarforcing.model import DiTConfig, WanDiT, i2v_input
from avatarforcing.pipeline import AvatarPipeline, resolve_device, resolve_dtype
from avatarforcing.sampler import StreamingSampler
from avatarforcing.schedule import WindowSchedule

from helpers import schedule_cfg

IMAGE, AUDIO = "assets/example.png", "assets/example.wav"


def as_dtype(pipe: AvatarPipeline, dtype: torch.dtype) -> AvatarPipeline:
    """The same pipeline (same weights) with the DiT and the VAE cast to ``dtype``."""
    return pipe.replace(model=copy.deepcopy(pipe.model).to(dtype), vae=copy.deepcopy(pipe.vae).to(dtype), dtype=dtype)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def compare(pipe32: AvatarPipeline, blocks: int, repo_root):
    pipe16 = as_dtype(pipe32, torch.bfloat16)
    wav = load_audio(repo_root / AUDIO)
    image = repo_root / IMAGE
    lat = {}
    frames = {}
    for name, pipe in (("fp32", pipe32), ("bf16", pipe16)):
        lat[name] = [x for _, x in pipe.stream_latents(image, wav, seed=0, num_blocks=blocks)]
        frames[name] = np.concatenate(list(pipe.stream(image, wav, seed=0, num_blocks=blocks)), axis=1)
    assert all(x.dtype == torch.bfloat16 for x in lat["bf16"][1:])     # [0] is the reference latent
    errors = [rel_error(a, b) for a, b in zip(lat["bf16"], lat["fp32"])]
    return errors, psnr(frames["bf16"], frames["fp32"])


@pytest.mark.parametrize("config,overrides", [
    ("configs/demo.yaml", []),
    # the anchor world's student: no reference channels (in_dim 16); also with the reference seeding the cache
    ("configs/world/v2_anchor_student.yaml", []),
    ("configs/world/v2_anchor_student.yaml", ["cache.style_anchor=false", "cache.reference_in_temporal=true"]),
    ("configs/world/anchor_student.yaml", []),          # world v1's attention-only student
])
def test_demo_pipeline_bf16_matches_fp32(repo_root, config, overrides):
    pipe = AvatarPipeline.from_config(load_config(repo_root / config, ["inference.dtype=fp32", *overrides]))
    errors, db = compare(pipe, 3, repo_root)
    assert max(errors) < 0.02, errors
    assert db > 40.0, db


def test_tiny_pipeline_bf16_matches_fp32(repo_root):
    torch.manual_seed(0)
    cfg = load_config(repo_root / "configs/tiny.yaml", ["inference.dtype=fp32", "inference.height=32",
                                                         "inference.width=32"])
    pipe = AvatarPipeline.from_config(cfg)
    with torch.no_grad():            # Wan's init zeroes the head: make every weight matter
        for p in pipe.model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
    errors, db = compare(pipe, 2, repo_root)
    assert max(errors) < 0.02, errors
    assert db > 35.0, db


def test_mid_config_streams_in_bf16():
    """The real 1.3B widths (dim 1536, 12 heads, ffn 8960, text 4096, audio 43008 -> 32) with 2 layers at 4x4
    latents: five blocks stream in bf16, the cache stays bf16 (no promotion), and match fp32."""
    torch.manual_seed(0)
    model = WanDiT(DiTConfig(num_layers=2, audio_layers=(0, 1))).eval().requires_grad_(False)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    sch = WindowSchedule.from_config(schedule_cfg(block_frames=2))
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, 1, 4, 4, generator=g)
    text = torch.randn(1, 512, 4096, generator=g) * 0.1
    audio = torch.randn(1, 11, 43008, generator=g)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        smp = StreamingSampler(m, sch, CacheConfig(), ref, text, audio=lambda a, b: audio[:, a:b],
                               noise=NoiseSource(0, dtype=dtype), num_blocks=5)
        with torch.no_grad():
            out[dtype] = [x for _, x in smp]
        kv = smp.cache.anchor.k + smp.cache.anchor.v + smp.cache.temporal.k + smp.cache.temporal.v
        assert {t.dtype for t in kv} == {dtype}
        assert all(torch.isfinite(x).all() for x in out[dtype])
    errors = [rel_error(a, b) for a, b in zip(out[torch.bfloat16], out[torch.float32])]
    assert max(errors) < 0.02, errors


def test_autocast_keeps_qkv_in_one_dtype():
    """Training runs fp32 master weights under bf16 autocast: the cached K and V must both be bf16
    (an fp32 RMSNorm weight used to promote q and k to fp32 while v stayed bf16)."""
    from helpers import random_tiny_model
    model = random_tiny_model(0)
    x = torch.randn(1, 16, 2, 4, 4)
    t = torch.full((1, 2), 500.0)
    text = torch.randn(1, 8, model.cfg.text_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, kv = model(i2v_input(x, x[:, :, :1], 1), t, None, text, torch.arange(2), kv=True)
    assert {k.dtype for k in kv.k} == {torch.bfloat16} and {v.dtype for v in kv.v} == {torch.bfloat16}
    assert all(torch.isfinite(k.float()).all() for k in kv.k)


def test_pure_bf16_norms_match_fp32():
    from avatarforcing.model import WanLayerNorm, WanRMSNorm
    x = torch.randn(2, 5, 64)
    for norm in (WanLayerNorm(64, elementwise_affine=True), WanRMSNorm(64)):
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.1)
        want = norm(x)
        got = copy.deepcopy(norm).to(torch.bfloat16)(x.bfloat16())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)


# ---- dtype / device requests -------------------------------------------------------------------


def test_dtype_and_device_errors():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(AvatarForcingError, match="fp16 is not supported.*use inference.dtype=bf16"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(AvatarForcingError, match="'int8' is not known; use auto, bf16 or fp32"):
        resolve_dtype("int8", cpu)
    with pytest.raises(AvatarForcingError, match="not supported; use auto, cpu, cuda"):
        resolve_device("mps")
    with pytest.raises(AvatarForcingError, match="is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(AvatarForcingError, match="no CUDA GPU is available.*inference.device=cpu"):
            resolve_device("cuda")


@pytest.mark.parametrize("override,message", [
    ("inference.dtype=fp16", "error: inference.dtype=fp16 is not supported"),
    ("inference.device=cuda", "error: inference.device=cuda requested but no CUDA GPU is available"),
])
def test_cli_dtype_device_errors_are_one_line(repo_root, tmp_path, override, message):
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "o.mp4"
    proc = subprocess.run([sys.executable, str(repo_root / "inference.py"), "--config", "configs/tiny.yaml",
                           "--output", str(out), override], capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_cli_bf16_demo(repo_root, tmp_path):
    """`python inference.py inference.dtype=bf16` on the demo writes the video."""
    out = tmp_path / "bf16.mp4"
    proc = subprocess.run([sys.executable, str(repo_root / "inference.py"), "--output", str(out),
                           "--duration", "1.5", "inference.dtype=bf16"], capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and proc.stdout.strip().splitlines()[-1] == str(out)


def test_wav2vec2_in_bf16_matches_fp32():
    """The audio encoder in bf16 (as on GPU): features close to fp32, offline and in a live window."""
    from avatarforcing.audio import Wav2Vec2Features
    torch.manual_seed(0)
    enc32 = Wav2Vec2Features.from_config()
    enc16 = copy.deepcopy(enc32)
    enc16.model.to(torch.bfloat16)
    wav = torch.randn(16000 * 2) * 0.1
    a, b = enc16.encode(wav)[1:], enc32.encode(wav)[1:]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.99, cos
