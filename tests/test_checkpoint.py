"""Checkpoint loaders on synthetic checkpoints with the exact key layouts, at tiny sizes (docs/spec.md sections 5, 8)."""
import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from avatarforcing import AvatarForcingError
from avatarforcing.checkpoint import (export_released, infer_dit_config, load_dit, load_student_state,
                                      load_wan_base_dit)
from avatarforcing.model import PRESETS, WanDiT

TINY = PRESETS["tiny"]
LORA_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def randomize(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + 2 * noise if "norm" in name and name.endswith("weight") else noise)
    return model


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(WanDiT(dataclasses.replace(TINY, **overrides)), seed).eval()


def zero_audio(model):
    with torch.no_grad():
        for p in model.audio_cond_projs.parameters():
            p.zero_()
    return model


def inputs(in_dim=33, frames=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, in_dim, frames, 4, 4, generator=g)
    t = torch.tensor([[900.0, 500.0, 100.0][:frames]])
    audio = torch.randn(1, frames, TINY.audio_dim, generator=g)
    text = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g)
    return x, t, audio, text


def _get(module, path):
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set(module, path, new):
    *parents, leaf = path.split(".")
    parent = _get(module, ".".join(parents))
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


class LoRALinear(nn.Module):
    """Unmerged LoRA: y = base(x) + scale * B(A(x))."""

    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b)


def released_with_lora(model, rank=4, seed=2):
    """Our state dict in the release's layout: 'model.' + FSDP wrappers + PEFT base_layer / lora_A / lora_B."""
    g = torch.Generator().manual_seed(seed)
    sd, lora = {}, {}
    for key, value in model.state_dict().items():
        mod = key.rsplit(".", 1)[0]
        is_target = any(mod.endswith("." + t) for t in LORA_TARGETS) and key.startswith("blocks.")
        if is_target:
            key = f"{mod}.base_layer.{key.rsplit('.', 1)[1]}"
            if key.endswith("weight"):
                out_f, in_f = value.shape
                a = torch.randn(rank, in_f, generator=g) * 0.2
                b = torch.randn(out_f, rank, generator=g) * 0.2
                sd[f"{mod}.lora_A.default.weight"], sd[f"{mod}.lora_B.default.weight"] = a, b
                lora[mod] = (a, b)
        sd[key] = value.clone()
    wrapped = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            n, rest = key.split(".", 2)[1:]
            key = f"blocks.{n}._fsdp_wrapped_module.{rest}"
        wrapped["model._fsdp_wrapped_module." + key] = value
    return wrapped, lora


# ------------------------------------------------------------------ released student, LoRA merge

def flow(model, x, t, audio, text):
    """WanDiT.forward on a ready input x (any in_dim: these tests build the channels themselves)."""
    return model(x, t, audio, text, torch.arange(x.shape[2]))[0]


def test_released_lora_merge_equals_unmerged_forward(tmp_path):
    base = tiny()
    raw, lora = released_with_lora(base, rank=4)
    torch.save({"generator": raw}, tmp_path / "model.pt")
    alpha = 8.0                                     # scale 2 (the release: alpha 64, rank 128)

    merged = tiny(seed=99)
    report = load_dit(merged, tmp_path / "model.pt", lora_alpha=alpha)
    assert report.lora_merged == len(lora) == TINY.num_layers * len(LORA_TARGETS)
    assert report.container == "released" and not report.newly_initialized

    unmerged = base
    for mod, (a, b) in lora.items():
        _set(unmerged, mod, LoRALinear(_get(unmerged, mod), a, b, alpha / 4))
    x, t, audio, text = inputs()
    with torch.no_grad():
        y_merged, y_ref = flow(merged, x, t, audio, text), flow(unmerged, x, t, audio, text)
        y_base = flow(tiny(), x, t, audio, text)
    diff = (y_merged - y_ref).abs().max().item()
    print(f"LoRA merge max abs diff {diff:.2e} (output scale {y_ref.abs().max().item():.2f})")
    assert diff < 1e-5
    assert (y_base - y_ref).abs().max() > 1e-2        # the LoRA matters: the test is not vacuous

    # default alpha 64 with the rank read from lora_A
    sd = load_student_state(tmp_path / "model.pt")
    a, b = lora["blocks.0.self_attn.q"]
    expect = base.blocks[0].self_attn.q.base.weight + 64 / 4 * b @ a
    assert torch.allclose(sd["blocks.0.self_attn.q.weight"], expect, atol=1e-5)
    assert not any("lora" in k or "base_layer" in k or "fsdp" in k for k in sd)


def test_generator_vs_ema_selection_and_export_roundtrip(tmp_path):
    gen, ema = tiny(seed=0).state_dict(), tiny(seed=1).state_dict()
    export_released(gen, tmp_path / "ckpt.pt", ema_state=ema)
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(raw) == {"generator", "generator_ema"} and all(k.startswith("model.") for k in raw["generator"])
    for use_ema, ref in ((False, gen), (True, ema)):
        sd = load_student_state(tmp_path / "ckpt.pt", use_ema=use_ema)
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    model = tiny(seed=5)
    report = load_dit(model, tmp_path / "ckpt.pt", use_ema=True)
    assert report.use_ema and report.loaded == len(ema)
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())

    export_released(gen, tmp_path / "no_ema.pt")
    with pytest.raises(AvatarForcingError, match=r"no_ema\.pt has no 'generator_ema'.*without use_ema"):
        load_student_state(tmp_path / "no_ema.pt", use_ema=True)
    torch.save({"generator_ema": {"model." + k: v for k, v in ema.items()}}, tmp_path / "ema_only.pt")
    with pytest.raises(AvatarForcingError, match=r"no 'generator' entry.*use_ema=True"):
        load_student_state(tmp_path / "ema_only.pt")
    torch.save(gen, tmp_path / "bare.pt")                              # a bare state dict is accepted
    assert torch.equal(load_student_state(tmp_path / "bare.pt")["head.modulation"], gen["head.modulation"])


# ------------------------------------------------------------------ diffusers oracle

def test_diffusers_oracle(tmp_path):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=TINY.num_heads, attention_head_dim=TINY.dim // TINY.num_heads,
        in_channels=TINY.in_dim, out_channels=TINY.out_dim, text_dim=TINY.text_dim, freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim, num_layers=TINY.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6)
    randomize(ref, seed=3, std=0.1).eval()
    ref.save_pretrained(tmp_path / "Wan-Diffusers" / "transformer", max_shard_size="200KB")   # sharded + index
    assert list((tmp_path / "Wan-Diffusers" / "transformer").glob("*.index.json"))

    model = WanDiT(TINY).eval()
    report = load_dit(model, tmp_path / "Wan-Diffusers")               # root folder -> transformer/
    assert report.naming == "diffusers" and report.loaded == len(ref.state_dict())
    assert report.newly_initialized and all(k.startswith("audio_") for k in report.newly_initialized)
    zero_audio(model)

    x, _, _, text = inputs()
    t = torch.tensor([700.0])
    with torch.no_grad():
        y_ref = ref(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        y = flow(model, x, t, None, text)
    diff = (y - y_ref).abs().max().item()
    print(f"diffusers oracle max abs diff {diff:.2e} (output scale {y_ref.abs().max().item():.2f})")
    assert y_ref.abs().max() > 0.1 and diff < 1e-5


# ------------------------------------------------------------------ original Wan layout, in_dim 16 -> 33

def test_original_wan_layout_expands_in_dim(tmp_path):
    m16 = zero_audio(tiny(seed=4, in_dim=16))
    base = {k: v for k, v in m16.state_dict().items() if not k.startswith(("audio_proj.", "audio_cond_projs."))}
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    folder.mkdir()
    save_file(base, folder / "diffusion_pytorch_model.safetensors")

    sd = load_wan_base_dit(folder, TINY)
    pe = sd["patch_embedding.weight"]
    assert pe.shape[1] == 33 and torch.equal(pe[:, :16], base["patch_embedding.weight"]) and not pe[:, 16:].any()

    m33 = tiny(seed=9)
    report = load_dit(m33, folder / "diffusion_pytorch_model.safetensors")
    assert report.expanded and len(report.newly_initialized) == 4 + 2 * len(TINY.audio_block_ids)
    zero_audio(m33)
    x, t, _, text = inputs(in_dim=16)
    ref_lat = torch.randn(1, 16, 1, 4, 4)
    x33 = torch.cat([x, ref_lat.expand(-1, -1, 3, -1, -1), torch.ones(1, 1, 3, 4, 4)], dim=1)
    with torch.no_grad():
        diff = (flow(m33, x33, t, None, text) - flow(m16, x, t, None, text)).abs().max().item()
    assert diff < 1e-5


def test_infer_dit_config():
    cfg = infer_dit_config(WanDiT(TINY).state_dict())
    assert cfg == {"dim": 64, "in_dim": 33, "patch_size": [1, 2, 2], "num_layers": 4, "ffn_dim": 128, "text_dim": 32,
                   "freq_dim": 32, "audio_proj_dim": 8, "audio_dim": 64, "out_dim": 16, "qk_norm": True,
                   "cross_attn_norm": True, "num_audio_layers": 2}


# ------------------------------------------------------------------ errors

def test_errors(tmp_path):
    model = WanDiT(TINY)
    with pytest.raises(AvatarForcingError, match=r"checkpoint not found: .*nope\.pt"):
        load_dit(model, tmp_path / "nope.pt")

    export_released(model.state_dict(), tmp_path / "ok.pt")
    save_file(model.state_dict(), tmp_path / "ok.safetensors")
    for name in ("ok.pt", "ok.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"half_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(AvatarForcingError, match=rf"half_{name} is not a readable checkpoint \(truncated download\?\)"):
            load_dit(model, tmp_path / f"half_{name}")

    torch.save({"foo.weight": torch.zeros(3), "bar": torch.zeros(2)}, tmp_path / "random.pt")
    with pytest.raises(AvatarForcingError, match=r"random\.pt does not match the model: \d+ missing keys \(patch_embedding"
                                                 r".*2 unexpected keys \(foo\.weight.*not a Wan2\.1"):
        load_dit(model, tmp_path / "random.pt")

    small = WanDiT(dataclasses.replace(TINY, dim=32))
    with pytest.raises(AvatarForcingError, match=r"ok\.pt: patch_embedding\.weight has shape \[64, 33, 1, 2, 2\] in the "
                                                 r"checkpoint but \[32, 33, 1, 2, 2\].*model\.dim=32 does not match the checkpoint \(64\)"):
        load_dit(small, tmp_path / "ok.pt")
    deeper = WanDiT(dataclasses.replace(TINY, num_layers=6))
    with pytest.raises(AvatarForcingError, match=r"missing keys \(blocks\.4\..*model\.num_layers=6 does not match the checkpoint \(4\)"):
        load_dit(deeper, tmp_path / "ok.pt")

    partial = {k: v for k, v in model.state_dict().items() if k != "blocks.1.ffn.2.bias"}
    export_released(partial, tmp_path / "partial.pt")
    with pytest.raises(AvatarForcingError, match=r"partial\.pt does not match the model: 1 missing keys \(blocks\.1\.ffn\.2\.bias\)"):
        load_dit(model, tmp_path / "partial.pt")
    assert load_dit(model, tmp_path / "partial.pt", strict=False).missing == ["blocks.1.ffn.2.bias"]

    torch.save({"generator": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(AvatarForcingError, match=r"pickled\.pt holds pickled Python objects.*allow_pickle=True"):
        load_dit(model, tmp_path / "pickled.pt")
    assert load_dit(model, tmp_path / "pickled.pt", allow_pickle=True).loaded == len(model.state_dict())

    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(AvatarForcingError, match=r"empty_dir holds no DiT weights"):
        load_dit(model, tmp_path / "empty_dir")

    index = {"weight_map": {"patch_embedding.weight": "shard-1.safetensors"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(AvatarForcingError, match=r"shard shard-1\.safetensors listed in .* is missing"):
        load_wan_base_dit(tmp_path)


# ------------------------------------------------------------------ CLI

def _cli():
    path = Path(__file__).resolve().parent.parent / "scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_convert_cli(tmp_path, capsys):
    main = _cli()
    base = tiny()
    raw, _ = released_with_lora(base)
    torch.save({"generator": raw, "generator_ema": raw}, tmp_path / "model.pt")
    assert main(["--input", str(tmp_path / "model.pt"), "--output", str(tmp_path / "dit.safetensors"), "--ema"]) == 0
    assert "merged LoRA into 40 linears" in capsys.readouterr().out

    a, b = tiny(seed=7), tiny(seed=8)
    load_dit(a, tmp_path / "model.pt")
    report = load_dit(b, tmp_path / "dit.safetensors")
    assert report.container == "safetensors" and report.lora_merged == 0
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    assert main(["--input", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and err.count("\n") == 1
