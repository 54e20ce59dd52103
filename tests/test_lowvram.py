"""Memory options: the low-VRAM preset (same output), fp8 weights (torchao), model CPU offload hooks."""
import logging
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from avatarforcing import AvatarForcingError
from avatarforcing.stream_state import CacheConfig
from avatarforcing.audio import Wav2Vec2Features
from avatarforcing.config import load_config
from avatarforcing.lowvram import LOW_VRAM_FFN_CHUNK, MemoryOptions, apply_memory_options, offload_model, quantize_fp8
from avatarforcing.pipeline import AvatarPipeline
from avatarforcing.schedule import WindowSchedule
from avatarforcing.text import TextEncoder
from avatarforcing.vae import WanVAE
from helpers import random_tiny_model, schedule_cfg


def inf(**kw):
    return OmegaConf.create({"quantize": "none", "offload": "none", "low_vram": False, **kw})


def test_option_errors():
    for bad, match in ((dict(quantize="int4"), "inference.quantize"), (dict(offload="disk"), "inference.offload"),
                       (dict(low_vram="yes"), "inference.low_vram")):
        with pytest.raises(AvatarForcingError, match=match):
            MemoryOptions.from_config(inf(**bad))
    assert MemoryOptions.from_config(inf(low_vram=True)).offload == "model"
    with pytest.raises(AvatarForcingError, match="compile_mode=default"):
        apply_memory_options(random_tiny_model(), None, None, None,
                             inf(offload="model", compile=True, compile_mode="reduce-overhead"), "cpu")


def tiny_pipeline(**inference) -> AvatarPipeline:
    cfg = load_config("configs/tiny.yaml", [f"inference.{k}={v}" for k, v in inference.items()])
    pipe = AvatarPipeline.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():              # Wan's init zeroes the output head: make the DiT (and its FFN) matter
        for p in pipe.model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return pipe


def frames(pipe, blocks=2):
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    wav = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    return np.concatenate(list(pipe.stream(img, wav, num_blocks=blocks)), axis=1)


def test_low_vram_preset_on_cpu_gives_the_same_video(caplog):
    ref = frames(tiny_pipeline())
    with caplog.at_level(logging.INFO, logger="avatarforcing.lowvram"):
        pipe = tiny_pipeline(low_vram="true")
    assert "offload=model changes nothing on cpu" in caplog.text
    assert all(b.ffn_chunk_tokens == LOW_VRAM_FFN_CHUNK for b in pipe.model.blocks)
    assert pipe.vae.decode_frames_per_call == 1 and not pipe.vae.decode_offload_cache
    pipe.model.set_ffn_chunk(7)                      # tiny windows are shorter than the preset's chunk
    out = frames(pipe)
    assert out.shape == ref.shape and np.abs(out.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ffn_equals_the_whole_ffn(dtype):
    """The low-VRAM FFN in token chunks gives the window forward's result, in fp32 and in bf16."""
    model = random_tiny_model(0).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 4, 8, 8, generator=g).to(dtype)
    t, text = torch.full((1, 4), 700.0), torch.randn(1, 8, model.cfg.text_dim, generator=g)
    with torch.no_grad():
        whole = model.clip(x, x[:, :, :1], t, None, text)
        model.set_ffn_chunk(24)                       # 256 tokens in chunks of 24 (the last one shorter)
        chunked = model.clip(x, x[:, :, :1], t, None, text)
    assert whole.abs().max() > 0.1
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


def test_low_vram_sends_the_text_encoder_to_the_cpu():
    class Lazy:
        device_policy = "auto"
    text = Lazy()
    applied = apply_memory_options(random_tiny_model(), object(), object(), text, inf(low_vram=True), "cpu")
    assert text.device_policy == "cpu" and applied["text_device"] == "cpu" and applied["offload"] == "none"


def test_fp8_without_torchao_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(AvatarForcingError, match=r"pip install -e \.\[fp8\]"):
        apply_memory_options(random_tiny_model(), None, None, None, inf(quantize="fp8"), "cpu")


def test_fp8_weights_match_bf16():
    pytest.importorskip("torchao")
    model = random_tiny_model(0).to(torch.bfloat16)
    x = torch.randn(1, 16, 4, 8, 8, dtype=torch.bfloat16)
    t = torch.full((1, 4), 500.0)
    text = torch.randn(1, 8, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model.clip(x, x[:, :, :1], t, None, text).float()
        count = quantize_fp8(model, torch.device("cpu"))
        out = model.clip(x, x[:, :, :1], t, None, text).float()
    assert count == 4 * (4 + 4 + 2)                  # q, k, v, o of both attentions and the FFN's two, per block
    assert type(model.blocks[0].ffn[0].weight).__name__ == "Float8Tensor"
    assert model.head.head.weight.dtype == torch.bfloat16     # outside the blocks: unchanged
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.08, rel


def test_offload_hooks_route_every_use_and_keep_the_output():
    """On the CPU the moves are no-ops, but the hooks run: each component is activated when it is used."""
    torch.manual_seed(0)
    audio = Wav2Vec2Features.from_config()
    model = random_tiny_model(0, audio_dim=4 * audio.feature_dim)
    vae = WanVAE.from_config(OmegaConf.create({"path": None, "base_dim": 8, "z_dim": 16, "latents_mean": None,
                                               "latents_std": None}))
    pipe = AvatarPipeline(model, vae, audio, TextEncoder.none(32, 8), WindowSchedule.from_config(schedule_cfg()),
                          CacheConfig(), 32, 32, resize="cover")
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    wav = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    ref = np.concatenate(list(pipe.stream(img, wav, num_blocks=2)), axis=1)
    group = offload_model(model, vae, audio, torch.device("cpu"))
    assert set(group.parts) == {"dit", "vae"} and model.patch_embedding not in group.parts["dit"]
    order = []
    onload = group.onload
    group.onload = lambda name: (order.append(name), onload(name))[1]
    out = np.concatenate(list(pipe.stream(img, wav, num_blocks=2)), axis=1)
    assert np.array_equal(out, ref)                  # the decoder's causal cache list is not copied by the hook
    runs = [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n]
    assert runs[:3] == ["vae", "dit", "vae"]         # reference encode, text K/V + anchor, reference decode
    assert runs[3:] == ["dit", "vae"] * (len(runs[3:]) // 2) and len(runs) >= 7   # steps and block decodes
