"""The synthetic world's latent codec: WanVAE's interface and latent layout, exact streaming, files, training."""
import numpy as np
import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.world.codec import WorldCodec, to_uint8, train_codec


def _codec(seed=0, **kw):
    torch.manual_seed(seed)
    codec = WorldCodec(**{"width": 8, **kw}).eval()
    with torch.no_grad():                       # non-trivial statistics so normalisation is exercised
        codec.latents_mean.normal_(0, 0.3)
        codec.latents_std.uniform_(0.5, 2.0)
    return codec


def _video(B=1, T=9, H=16, W=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


def test_shapes_and_properties():
    codec = _codec()
    assert codec.spatial_ratio == 8 and codec.temporal_ratio == 4 and codec.z_dim == 16
    for T in (1, 5, 9):
        z = codec.encode_video(_video(B=2, T=T))
        assert z.shape == (2, 16, 1 + (T - 1) // 4, 2, 3)
        out = codec.decode(z)
        assert out.shape == (2, 3, T, 16, 24)
        assert out.min() >= -1 and out.max() <= 1
    img = _video(B=3, T=1)[:, :, 0]
    zi = codec.encode_image(img)
    assert zi.shape == (3, 16, 1, 2, 3)
    # the image latent is the video's first latent (causal first frame), the rest do not change it
    v = _video(B=3, T=5)
    v[:, :, 0] = img
    assert torch.allclose(codec.encode_video(v)[:, :, :1], zi, atol=1e-6)
    assert codec.decode(zi).shape == (3, 3, 1, 16, 24)
    u8 = to_uint8(codec.decode(zi))
    assert u8.dtype == np.uint8 and u8.shape == (3, 1, 16, 24, 3)
    assert WorldCodec().num_parameters() < 2_000_000
    assert to_uint8(codec.decode(zi)[0]).shape == (1, 16, 24, 3)


def test_half_precision_keeps_float32_statistics():
    codec = _codec()
    mean = codec.latents_mean.clone()
    codec = codec.to(torch.bfloat16)
    assert codec.latents_mean.dtype == torch.float32 and torch.equal(codec.latents_mean, mean)
    z = codec.encode_video(_video(T=5))
    assert z.dtype == torch.float32 and z.shape == (1, 16, 2, 2, 3)
    assert codec.decode(z).dtype == torch.float32


def test_latent_k_sees_only_its_frames():
    codec = _codec()
    v = _video(T=9)
    z = codec.encode_video(v)
    v2 = v.clone()
    v2[:, :, 5:9] = -v2[:, :, 5:9]              # frames 5..8 -> latent 2 only
    z2 = codec.encode_video(v2)
    assert torch.equal(z[:, :, :2], z2[:, :, :2]) and not torch.allclose(z[:, :, 2], z2[:, :, 2])


def test_stream_decode_equals_one_shot():
    codec = _codec()
    z = torch.randn(2, 16, 6, 2, 3)
    full = codec.decode(z)
    dec = codec.stream_decoder()
    outs, i = [], 0
    for n in (1, 2, 3):
        out = dec.push(z[:, :, i:i + n])
        assert out.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        outs.append(out)
        i += n
    assert torch.equal(torch.cat(outs, 2), full)
    # a first chunk of several latents works as well
    dec = codec.stream_decoder()
    assert torch.equal(torch.cat([dec.push(z[:, :, :4]), dec.push(z[:, :, 4:])], 2), full)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    codec = _codec(seed=3, num_res=1)
    v = _video(T=5, H=8, W=16)
    path = codec.save(tmp_path / f"codec{suffix}")
    loaded = WorldCodec.load(path)
    assert loaded.config == codec.config
    assert torch.equal(loaded.latents_mean, codec.latents_mean) and torch.equal(loaded.latents_std, codec.latents_std)
    z = codec.encode_video(v)
    assert torch.equal(loaded.encode_video(v), z)
    assert torch.equal(loaded.decode(z), codec.decode(z))


def test_loads_files_with_the_older_decoder_bias(tmp_path):
    """Codec files written before the per-position patch bias (e.g. assets/demo/codec.pt) still load, exactly."""
    codec = _codec(seed=4, num_res=1)
    with torch.no_grad():
        codec.decoder.patch_bias.copy_(torch.randn(1, 12, 1, 1).expand(1, 12, 8, 8))
    state = {k: v.clone() for k, v in codec.state_dict().items()}
    state["decoder.linear.bias"] = state.pop("decoder.patch_bias")[0, :, 0, 0].clone()
    torch.save({"format": "avatarforcing.world_codec", "version": 1, "config": codec.config, "state_dict": state},
               tmp_path / "old.pt")
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(WorldCodec.load(tmp_path / "old.pt").decode(z), codec.decode(z))


def test_errors(tmp_path):
    codec = _codec()
    for T in (2, 4, 6, 8):
        with pytest.raises(AvatarForcingError, match="1 \\+ 4k"):
            codec.encode_video(_video(T=T))
    with pytest.raises(AvatarForcingError, match="multiple of 8"):
        codec.encode_video(_video(T=5, H=12))
    with pytest.raises(AvatarForcingError, match="multiple of 8"):
        codec.encode_image(torch.zeros(1, 3, 16, 20))
    with pytest.raises(AvatarForcingError):
        codec.encode_image(torch.zeros(1, 4, 16, 16))
    with pytest.raises(AvatarForcingError):
        codec.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(AvatarForcingError, match="not found"):
        WorldCodec.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(AvatarForcingError, match="not a world codec"):
        WorldCodec.load(bad)


def _toy_clips(n=4, T=9, size=16, seed=0):
    """Cheap clips (no renderer): moving colour gradients with a square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    clips = []
    for _ in range(n):
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        frames = []
        for t in range(T):
            img = c0 * (1 - xx[..., None]) + c1 * yy[..., None]
            x0 = 2 + (t % 6)
            img[4:10, x0:x0 + 5] = rng.uniform(0, 1, 3)
            frames.append(np.clip(img * 255, 0, 255).astype(np.uint8))
        clips.append(np.stack(frames))
    return clips


def test_short_training_lowers_loss(tmp_path):
    clips = _toy_clips()
    threads = torch.get_num_threads()
    r = train_codec(tmp_path / "c.pt", steps=40, batch=8, clips=clips, width=8, num_res=1, crop=None,
                    lr=3e-3, log_every=0, pca_init=False)
    assert r["loss_last"] < 0.5 * r["loss_first"]
    assert torch.get_num_threads() == threads                                  # restored
    codec = WorldCodec.load(tmp_path / "c.pt")
    assert not any(p.requires_grad for p in codec.parameters())
    z = codec.encode_video(torch.as_tensor(clips[0]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    # latents are normalised with statistics measured on the training data
    assert abs(float(z.mean())) < 0.5 and 0.3 < float(z.std()) < 3.0
    assert np.isfinite(r["psnr"]) and r["heldout"] is False


def test_pca_init_is_a_good_linear_codec():
    clips = _toy_clips()
    groups = torch.stack([torch.as_tensor(c[1:5]).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
    codec = WorldCodec(width=8, num_res=1)
    with torch.no_grad():
        before = float(((codec.decode_groups(codec.encode_groups(groups)) - groups) ** 2).mean())
        kept = codec.init_linear(groups)
        after = float(((codec.decode_groups(codec.encode_groups(groups)) - groups) ** 2).mean())
    assert 0.5 < kept <= 1.0 and after < 0.1 * before


def test_training_on_rendered_clips(tmp_path):
    """The default data path (clips rendered with generate_clip, a growing pool, held-out PSNR), tiny."""
    r = train_codec(None, steps=4, batch=2, size=16, width=8, num_res=1, pool_clips=2, pool_seconds=0.2,
                    refresh_every=2, eval_clips=1, eval_seconds=0.2, log_every=0)
    assert r["steps"] == 4 and r["heldout"] is True and r["pool_clips"] == 3 and np.isfinite(r["psnr"])


def test_global_latent_scale_keeps_each_channels_share():
    torch.manual_seed(0)
    codec = WorldCodec(z_dim=8, width=8)
    videos = [torch.rand(1, 3, 5, 16, 16) * 2 - 1 for _ in range(3)]
    codec.compute_latent_stats(videos)
    per_channel = codec.latents_std.clone()
    codec.compute_latent_stats(videos, scale="global")
    assert torch.allclose(codec.latents_std, per_channel.pow(2).mean().sqrt().expand(8), rtol=1e-4)
    z = codec.encode_video(videos[0])
    assert torch.allclose(codec.normalize(codec.denormalize(z)), z, atol=1e-5)
    # normalised latents: unit variance on average over channels, each channel keeps its share
    var = torch.cat([codec.encode_video(v) for v in videos]).var((0, 2, 3, 4))
    assert var.mean().item() == pytest.approx(1.0, rel=0.05)
    assert torch.allclose(var / var.mean(), per_channel.pow(2) / per_channel.pow(2).mean(), rtol=0.05)
    with pytest.raises(AvatarForcingError, match="'channel' or 'global'"):
        codec.compute_latent_stats(videos, scale="per-frame")
