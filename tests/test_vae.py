import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from omegaconf import OmegaConf

from avatarforcing import AvatarForcingError
from avatarforcing.vae import WAN_VAE_FILE, WanVAE, build_vae, diffusers_to_wan_key, to_uint8

TINY = {"path": None, "base_dim": 8, "z_dim": 16, "latents_mean": None, "latents_std": None}


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE.from_config(OmegaConf.create(TINY))


def wan_layout(vae):
    return {diffusers_to_wan_key(k): v.clone() for k, v in vae.model.state_dict().items()}


def test_encode_decode_shapes(vae):
    assert (vae.spatial_ratio, vae.temporal_ratio, vae.z_dim) == (8, 4, 16)
    img = torch.rand(2, 3, 16, 24) * 2 - 1
    z = vae.encode_image(img)
    assert z.shape == (2, 16, 1, 2, 3)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z = vae.encode_video(video)
    assert z.shape == (1, 16, 3, 2, 2)
    out = vae.decode(z)
    assert out.shape == (1, 3, 9, 16, 16) and out.min() >= -1 and out.max() <= 1
    # z_dim 16 uses the Wan2.1 statistics; normalization is undone exactly
    assert vae.latents_mean.flatten()[0].item() == pytest.approx(-0.7571)
    mu = vae.model.encode(video).latent_dist.mean
    assert torch.allclose(vae.denormalize(z), mu, atol=1e-5)
    # casting the module does not round the statistics
    assert WanVAE.from_config(OmegaConf.create(TINY)).to(torch.bfloat16).latents_mean.dtype == torch.float32


def test_streaming_decode_equals_one_shot(vae):
    torch.manual_seed(1)
    z = torch.randn(1, 16, 6, 2, 3)
    full = vae.decode(z)
    assert full.shape == (1, 3, 1 + 4 * 5, 16, 24)
    dec = vae.stream_decoder()
    parts = [dec.push(z[:, :, :1]), dec.push(z[:, :, 1:3]), dec.push(z[:, :, 3:6])]
    assert [p.shape[2] for p in parts] == [1, 8, 12]
    assert (torch.cat(parts, 2) - full).abs().max() < 1e-5
    # a multi-frame first block is split internally (first chunk = one latent frame)
    dec = vae.stream_decoder()
    parts = [dec.push(z[:, :, :4]), dec.push(z[:, :, 4:6])]
    assert [p.shape[2] for p in parts] == [13, 8]
    assert (torch.cat(parts, 2) - full).abs().max() < 1e-5


def test_streaming_decode_one_frame_per_call_equals_block_decode(vae):
    """Low-VRAM mode: the decoder runs on one latent frame at a time; the frames are the same."""
    torch.manual_seed(2)
    z = torch.randn(1, 16, 9, 2, 3)
    blocks = [z[:, :, :1], z[:, :, 1:5], z[:, :, 5:9]]
    dec = vae.stream_decoder()
    assert dec.frames_per_call == 0
    ref = [dec.push(b) for b in blocks]
    for n in (1, 2):
        dec = vae.stream_decoder(frames_per_call=n)
        calls = []
        hook = vae.model.decoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[2]))
        try:
            out = [dec.push(b) for b in blocks]
        finally:
            hook.remove()
        assert calls == [1] + [n] * (8 // n)
        assert [o.shape for o in out] == [r.shape for r in ref]
        assert max((o - r).abs().max().item() for o, r in zip(out, ref)) < 1e-5
    # the VAE's default (set by inference.low_vram) and a first block of several frames
    vae.decode_frames_per_call = 1
    try:
        dec = vae.stream_decoder()
        assert dec.frames_per_call == 1
        out = [dec.push(z[:, :, :5]), dec.push(z[:, :, 5:9])]
    finally:
        vae.decode_frames_per_call = 0
    assert (torch.cat(out, 2) - torch.cat(ref, 2)).abs().max() < 1e-5


def test_encode_errors(vae):
    with pytest.raises(AvatarForcingError, match="1 \\+ 4k frames"):
        vae.encode_video(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(AvatarForcingError, match="multiples of 8"):
        vae.encode_image(torch.zeros(1, 3, 20, 16))
    with pytest.raises(AvatarForcingError, match="latents"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))


def test_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(3, 1, 1, 4)[None]  # [1, 3, 1, 1, 4]
    u = to_uint8(x)
    assert u.shape == (1, 1, 1, 4, 3) and u.dtype == np.uint8
    assert u[0, 0, 0, :, 0].tolist() == [0, 128, 255, 255]
    assert to_uint8(x[0]).shape == (1, 1, 4, 3)


def test_wan_checkpoint_layout_loads(vae, tmp_path):
    orig = wan_layout(vae)
    assert set(convert_wan_vae_to_diffusers(dict(orig))) == set(vae.model.state_dict())  # the inverse is exact
    assert "decoder.upsamples.3.resample.1.weight" in orig and "encoder.downsamples.0.residual.0.gamma" in orig
    torch.save(orig, tmp_path / WAN_VAE_FILE)
    (tmp_path / "config.json").write_text('{"_class_name": "WanModel", "dim": 1536}')  # the Wan folder's DiT config
    cfg = OmegaConf.create({**TINY, "path": str(tmp_path), "base_dim": 96})  # architecture comes from the file
    loaded = build_vae(cfg)
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(loaded.decode(z), vae.decode(z))
    loaded = WanVAE.from_pretrained(tmp_path / WAN_VAE_FILE)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), vae.model.state_dict().values()))


def test_diffusers_folder_loads(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = WanVAE.from_pretrained(tmp_path / "pipe")
    z = torch.randn(1, 16, 1, 2, 2)
    assert torch.equal(loaded.decode(z), vae.decode(z))


def test_latent_stats_for_other_z_dims():
    torch.manual_seed(0)
    v = WanVAE.from_config(OmegaConf.create({**TINY, "z_dim": 4}))
    assert torch.equal(v.latents_mean.flatten(), torch.zeros(4)) and torch.equal(v.latents_std.flatten(), torch.ones(4))
    v = WanVAE.from_config(OmegaConf.create({**TINY, "z_dim": 4, "latents_mean": [1, 2, 3, 4]}))
    assert v.latents_mean.flatten().tolist() == [1, 2, 3, 4]
    with pytest.raises(AvatarForcingError, match="z_dim is 4"):
        WanVAE.from_config(OmegaConf.create({**TINY, "z_dim": 4, "latents_std": [1.0]}))


def test_checkpoint_errors(vae, tmp_path):
    with pytest.raises(AvatarForcingError, match="not found"):
        WanVAE.from_pretrained(tmp_path / "missing.pth")
    with pytest.raises(AvatarForcingError, match="not found"):
        WanVAE.from_pretrained(tmp_path)  # a folder without a VAE
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    with pytest.raises(AvatarForcingError, match="not a Wan VAE"):
        WanVAE.from_pretrained(tmp_path / "dit")
    orig = wan_layout(vae)
    orig.pop("decoder.head.2.weight")
    orig["decoder.extra.weight"] = torch.zeros(1)
    torch.save(orig, tmp_path / "bad.pth")
    with pytest.raises(AvatarForcingError, match=r"bad\.pth.*missing keys \['decoder\.head\.2\.weight'\]"
                                                 r".*unexpected keys \['decoder\.extra\.weight'\]"):
        WanVAE.from_pretrained(tmp_path / "bad.pth")
    orig = wan_layout(vae)
    orig["decoder.head.2.weight"] = torch.zeros(3, 8, 1, 1, 1)
    torch.save(orig, tmp_path / "shape.pth")
    with pytest.raises(AvatarForcingError, match="shapes"):
        WanVAE.from_pretrained(tmp_path / "shape.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(AvatarForcingError, match="not a Wan VAE"):
        WanVAE.from_pretrained(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(AvatarForcingError, match="cannot read"):
        WanVAE.from_pretrained(tmp_path / "junk.pth")
