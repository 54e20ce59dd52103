"""The synthetic world's small latent codec: a drop-in for ``avatarforcing.vae.WanVAE``.

Same latent layout as the Wan2.1 VAE (16 channels, 8x spatial, 4x temporal with a causal first frame):
latent 0 <- video frame 0 alone, latent k >= 1 <- frames 4k-3 .. 4k.  A full Wan VAE (even at base_dim 16)
takes seconds per training step on CPU; this codec is a 2D conv auto-encoder over the 4 frames of a group
stacked channel-wise (12 channels), so it trains to > 30 dB on the world's 64x64 faces in minutes.

* Encoder: a linear 8x8-patch projection (conv k8 s8, 12 -> z) plus a conv net: pixel-unshuffle 2x
  (12 -> 48 channels) -> conv -> [res block, stride-2 conv] x 2 -> res blocks -> 1x1 conv (zero-initialised)
  to ``z_dim``: 8x spatial.  Frame 0 is encoded as the group of frame 0 repeated 4 times.
* Decoder mirrored: a linear 8x8-patch expansion (transposed conv k8 s8 + a mean-patch bias) plus a conv net
  with pixel-shuffle upsampling and a zero-initialised output; 4 frames per latent; for latent 0 it returns
  the mean of the 4 (all trained to equal frame 0).
* ``train_codec`` starts the linear paths at the PCA of the training patches (~26 dB on its own), so the
  nets only learn the non-linear remainder: 31.4 dB held-out PSNR at 64x64 after 2,500 steps (~4.5 min on
  one CPU thread); 1.97M parameters at the default width 32.
* Every latent frame is encoded and decoded independently, so ``stream_decoder()`` equals ``decode()``
  exactly, whatever the chunking.
* Deterministic auto-encoder; during training the decoder sees the latent with a little relative noise
  and a small L2 penalty keeps it bounded (a smooth latent space for the DiT).  After training, per-channel
  ``latents_mean`` / ``latents_std`` are measured on training data: ``encode_*`` return normalised
  latents (~zero mean, unit variance), ``decode`` undoes it — as WanVAE does with the Wan statistics.

Files (``save`` / ``WorldCodec.load``): a single ``.pt`` (torch.save of a dict with ``format``, ``config``,
``state_dict``) or ``.safetensors`` (the tensors, the config as json in the metadata).  The state dict holds
the latent statistics.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import AvatarForcingError

log = logging.getLogger(__name__)

FORMAT = "avatarforcing.world_codec"
FORMAT_VERSION = 1
SPATIAL_RATIO = 8
TEMPORAL_RATIO = 4


# ----------------------------------------------------------------------------------------------
# helpers


def to_uint8(frames) -> np.ndarray:
    """Video in [-1, 1], [B, 3, T, H, W] -> uint8 numpy [B, T, H, W, 3] ([3, T, H, W] -> [T, H, W, 3]);
    the same as ``avatarforcing.vae.to_uint8``."""
    x = torch.as_tensor(frames)
    if x.ndim < 4 or x.shape[-4] != 3:
        raise AvatarForcingError(f"to_uint8 needs a video [B, 3, T, H, W] or [3, T, H, W] in [-1, 1], got "
                                 f"{tuple(x.shape)}")
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-4, -1).cpu().numpy()


def frames_to_tensor(frames) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (or [B, T, H, W, 3]) -> float video [3, T, H, W] (or [B, 3, T, H, W]) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames))
    if x.ndim == 4:
        return x.permute(3, 0, 1, 2).float() / 127.5 - 1.0
    if x.ndim == 5:
        return x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    raise AvatarForcingError(f"frames must be uint8 [T, H, W, 3] or [B, T, H, W, 3], got {tuple(x.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] after rounding both to uint8 (peak 255)."""
    qa = ((a.float().clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.float().clamp(-1, 1) + 1) * 127.5).round()
    mse = float(((qa - qb) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _check_spatial(H: int, W: int, what: str) -> None:
    if H % SPATIAL_RATIO or W % SPATIAL_RATIO or H <= 0 or W <= 0:
        raise AvatarForcingError(f"{what} size {H}x{W} is not a multiple of {SPATIAL_RATIO} (the codec's spatial "
                                 f"compression); resize or crop to e.g. {max(8, H // 8 * 8)}x{max(8, W // 8 * 8)}")


# ----------------------------------------------------------------------------------------------
# network


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.bias)
        with torch.no_grad():
            self.conv2.weight.mul_(0.3)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    """[N, 12, H, W] -> [N, z, H/8, W/8]: a linear 8x8 patch projection (PCA-initialised by ``train_codec``)
    plus a conv net whose zero-initialised output adds the non-linear part."""

    def __init__(self, z_dim: int, widths: Sequence[int], num_res: int):
        super().__init__()
        c1, c2, c3 = widths
        cin = 3 * TEMPORAL_RATIO
        self.linear = nn.Conv2d(cin, z_dim, SPATIAL_RATIO, stride=SPATIAL_RATIO)
        self.stem = nn.Conv2d(cin * 4, c1, 3, padding=1)                 # after pixel-unshuffle 2x
        self.res1 = ResBlock(c1)
        self.down1 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)
        self.res2 = ResBlock(c2)
        self.down2 = nn.Conv2d(c2, c3, 4, stride=2, padding=1)
        self.res3 = nn.Sequential(*[ResBlock(c3) for _ in range(num_res)])
        self.out = nn.Conv2d(c3, z_dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        h = self.stem(F.pixel_unshuffle(x, 2))
        h = self.down1(self.res1(h))
        h = self.down2(self.res2(h))
        return self.linear(x) + self.out(F.silu(self.res3(h)))


class Decoder(nn.Module):
    """[N, z, h, w] -> [N, 12, 8h, 8w]: a linear 8x8 patch expansion (PCA-initialised) plus a mirrored conv net
    (pixel-shuffle upsampling) whose zero-initialised output adds the non-linear part."""

    def __init__(self, z_dim: int, widths: Sequence[int], num_res: int):
        super().__init__()
        c1, c2, c3 = widths
        cout = 3 * TEMPORAL_RATIO
        self.linear = nn.ConvTranspose2d(z_dim, cout, SPATIAL_RATIO, stride=SPATIAL_RATIO, bias=False)
        self.patch_bias = nn.Parameter(torch.zeros(1, cout, SPATIAL_RATIO, SPATIAL_RATIO))   # mean 8x8 patch
        self.inp = nn.Conv2d(z_dim, c3, 3, padding=1)
        self.res3 = nn.Sequential(*[ResBlock(c3) for _ in range(num_res)])
        self.up2 = nn.Conv2d(c3, 4 * c2, 3, padding=1)                    # + pixel-shuffle 2x
        self.res2 = ResBlock(c2)
        self.up1 = nn.Conv2d(c2, 4 * c1, 3, padding=1)
        self.res1 = ResBlock(c1)
        self.out = nn.Conv2d(c1, cout * 4, 3, padding=1)                  # + pixel-shuffle 2x
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z):
        h = self.res3(self.inp(z))
        h = self.res2(F.pixel_shuffle(self.up2(F.silu(h)), 2))
        h = self.res1(F.pixel_shuffle(self.up1(F.silu(h)), 2))
        lin = self.linear(z) + self.patch_bias.repeat(1, 1, z.shape[2], z.shape[3])
        return lin + F.pixel_shuffle(self.out(F.silu(h)), 2)


# ----------------------------------------------------------------------------------------------
# the codec


class WorldCodec(nn.Module):
    """A light codec with WanVAE's interface and latent layout (see the module docstring).

    Any H, W that are multiples of 8.  Inputs in [-1, 1]; latents returned by ``encode_*`` are normalised
    with ``latents_mean`` / ``latents_std`` (identity until ``compute_latent_stats`` has run)."""

    spatial_ratio = SPATIAL_RATIO
    temporal_ratio = TEMPORAL_RATIO

    def __init__(self, z_dim: int = 16, width: int = 32, num_res: int = 2, widths: Sequence[int] | None = None):
        super().__init__()
        widths = tuple(int(w) for w in (widths or (width, 2 * width, 4 * width)))
        if len(widths) != 3 or min(widths) <= 0 or z_dim <= 0:
            raise AvatarForcingError(f"WorldCodec needs z_dim > 0 and 3 positive widths, got z_dim={z_dim}, "
                                     f"widths={widths}")
        self.config = dict(z_dim=int(z_dim), width=int(width), num_res=int(num_res), widths=list(widths))
        self.z_dim = int(z_dim)
        self.encoder = Encoder(self.z_dim, widths, num_res)
        self.decoder = Decoder(self.z_dim, widths, num_res)
        self.register_buffer("latents_mean", torch.zeros(self.z_dim))
        self.register_buffer("latents_std", torch.ones(self.z_dim))

    def _apply(self, fn, recurse=True):
        # the latent statistics stay float32 under `.to(bf16)` (as WanVAE's do); they follow the device
        stats = (self.latents_mean.detach().float().clone(), self.latents_std.detach().float().clone())
        out = super()._apply(fn, recurse)
        self.latents_mean = stats[0].to(self.latents_mean.device)
        self.latents_std = stats[1].to(self.latents_std.device)
        return out

    # ---- raw (unnormalised) group codec: what training uses ---------------------------------
    def encode_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """[N, 3, 4, H, W] in [-1, 1] -> raw latents [N, z, H/8, W/8]."""
        N, C, G, H, W = groups.shape
        return self.encoder(groups.reshape(N, C * G, H, W))

    def decode_groups(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents [N, z, h, w] -> [N, 3, 4, 8h, 8w] (not clamped)."""
        x = self.decoder(z)
        N, _, H, W = x.shape
        return x.reshape(N, 3, TEMPORAL_RATIO, H, W)

    # ---- normalisation -------------------------------------------------------------------------
    def _stat(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device, torch.float32).view(1, -1, 1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """raw codec latents [B, z, F, h, w] -> DiT latents (float32)."""
        return (z.float() - self._stat(self.latents_mean, z)) / self._stat(self.latents_std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latents -> raw codec latents (float32)."""
        return z.float() * self._stat(self.latents_std, z) + self._stat(self.latents_mean, z)

    # ---- WanVAE interface ----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.stem.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.stem.weight.device

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise AvatarForcingError(f"decode needs latents [B, {self.z_dim}, F, h, w], got "
                                     f"{tuple(getattr(latents, 'shape', ()))}")

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] (T = 1 + 4k) -> raw latents [B, z, 1 + k, h, w]."""
        B, _, T, H, W = video.shape
        video = video.to(self.device, self.dtype)
        first = video[:, :, :1].expand(B, 3, TEMPORAL_RATIO, H, W)            # frame 0 repeated 4x
        k = (T - 1) // TEMPORAL_RATIO
        rest = video[:, :, 1:].reshape(B, 3, k, TEMPORAL_RATIO, H, W).permute(0, 2, 1, 3, 4, 5)
        groups = torch.cat([first[:, None], rest], 1).reshape(B * (1 + k), 3, TEMPORAL_RATIO, H, W)
        z = self.encode_groups(groups)                                          # [B(1+k), z, h, w]
        return z.reshape(B, 1 + k, self.z_dim, H // 8, W // 8).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalised latents [B, z, 1 + k, H/8, W/8]."""
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            raise AvatarForcingError(f"encode_video needs a video [B, 3, T, H, W] in [-1, 1], got "
                                     f"{tuple(getattr(video, 'shape', ()))}")
        T, H, W = video.shape[2:]
        if T < 1 or (T - 1) % TEMPORAL_RATIO:
            raise AvatarForcingError(f"encode_video got {T} frames; the codec needs 1 + 4k frames (e.g. "
                                     f"{1 + max(0, (T - 1) // 4) * 4} or {1 + (max(T - 1, 0) + 3) // 4 * 4}); trim or pad the video")
        _check_spatial(H, W, "video")
        return self.normalize(self._encode_raw(video))

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latents [B, z, 1, H/8, W/8] (the video's first-frame latent)."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
            raise AvatarForcingError(f"encode_image needs images [B, 3, H, W] in [-1, 1], got "
                                     f"{tuple(getattr(image, 'shape', ()))}")
        _check_spatial(image.shape[2], image.shape[3], "image")
        return self.normalize(self._encode_raw(image[:, :, None]))

    def _decode_frames(self, latents: torch.Tensor, first: bool) -> torch.Tensor:
        """normalised latents [B, z, f, h, w] -> [B, 3, n, H, W]; ``first``: latents[:, :, 0] is latent 0."""
        B, _, f, h, w = latents.shape
        if f == 0:
            return torch.zeros(B, 3, 0, h * 8, w * 8, device=self.device)
        z = self.denormalize(latents.to(self.device)).to(self.dtype)
        x = self.decode_groups(z.permute(0, 2, 1, 3, 4).reshape(B * f, self.z_dim, h, w))
        x = x.reshape(B, f, 3, TEMPORAL_RATIO, h * 8, w * 8).permute(0, 2, 1, 3, 4, 5)   # [B, 3, f, 4, H, W]
        parts = []
        if first:
            parts.append(x[:, :, 0].mean(2, keepdim=True))                   # latent 0 -> 1 frame
            x = x[:, :, 1:]
        if x.shape[2]:
            parts.append(x.reshape(B, 3, -1, h * 8, w * 8))
        return torch.cat(parts, 2).clamp(-1, 1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, F, h, w] (latent 0 = first frame) -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1]."""
        self._check_latents(latents)
        if latents.shape[2] < 1:
            raise AvatarForcingError("decode needs at least one latent frame")
        return self._decode_frames(latents, first=True)

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for latents arriving in chunks: the first latent gives 1 frame, each later one 4;
        the concatenated output equals ``decode`` of the concatenated latents exactly."""
        return StreamDecoder(self)

    # convenience: WanVAE exposes these names too
    @staticmethod
    def to_uint8(video):
        return to_uint8(video)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_video(video))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_linear(self, groups: torch.Tensor) -> float:
        """Set the linear 8x8 patch paths of encoder and decoder to the PCA of the patches of ``groups``
        [N, 3, 4, H, W] (the best linear codec: training starts from it).  -> the fraction of variance kept."""
        N, C, G, H, W = groups.shape
        x = groups.reshape(N, C * G, H, W).double()
        p = F.unfold(x, SPATIAL_RATIO, stride=SPATIAL_RATIO).permute(0, 2, 1).reshape(-1, C * G * 64)
        mu = p.mean(0)
        _, S, Vt = torch.linalg.svd(p - mu, full_matrices=False)
        k = min(self.z_dim, Vt.shape[0])
        V = torch.zeros(self.z_dim, p.shape[1], dtype=torch.float64)
        V[:k] = Vt[:k]
        enc, dec = self.encoder.linear, self.decoder.linear
        enc.weight.copy_(V.reshape(enc.weight.shape).to(enc.weight))
        enc.bias.copy_((-V @ mu).to(enc.bias))
        dec.weight.copy_(V.reshape(dec.weight.shape).to(dec.weight))
        self.decoder.patch_bias.copy_(mu.reshape(self.decoder.patch_bias.shape).to(dec.weight))
        return float((S[:k] ** 2).sum() / (S ** 2).sum().clamp_min(1e-12))

    # ---- latent statistics ---------------------------------------------------------------------
    @torch.no_grad()
    def compute_latent_stats(self, videos: Sequence[torch.Tensor], min_std: float = 1e-3,
                             scale: str = "channel") -> None:
        """Set per-channel ``latents_mean`` / ``latents_std`` from videos [3, T, H, W] or [B, 3, T, H, W]
        (T = 1 + 4k), so that normalised latents have ~zero mean and unit variance (``scale="channel"``, as
        WanVAE's statistics do), or one std for all channels, their root-mean-square (``"global"``): unit variance
        on average, and each channel keeps its share.  The codec's channels are PCA-like (the strongest carries
        ~45x the std of the weakest at 48 channels); per-channel whitening would give the faint detail channels
        the DiT loss weight of the face's layout, a global scale keeps latent distances proportional to pixels."""
        if scale not in ("channel", "global"):
            raise AvatarForcingError(f"latent scale must be 'channel' or 'global', got '{scale}'")
        total = torch.zeros(self.z_dim, dtype=torch.float64)
        sq = torch.zeros(self.z_dim, dtype=torch.float64)
        n = 0
        for v in videos:
            v = v[None] if v.ndim == 4 else v
            z = self._encode_raw(v).double().cpu()                              # [B, z, F, h, w]
            total += z.sum((0, 2, 3, 4))
            sq += (z ** 2).sum((0, 2, 3, 4))
            n += z.numel() // self.z_dim
        if n == 0:
            raise AvatarForcingError("compute_latent_stats got no videos")
        mean = total / n
        var = (sq / n - mean ** 2).clamp_min(0)
        std = (var.mean().sqrt().expand_as(var) if scale == "global" else var.sqrt()).clamp_min(min_std)
        self.latents_mean.copy_(mean.to(self.latents_mean))
        self.latents_std.copy_(std.to(self.latents_std))

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: os.PathLike | str, extra: dict | None = None) -> Path:
        """Write config + weights + latent statistics to one ``.pt`` or ``.safetensors`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}
        meta = dict(format=FORMAT, version=FORMAT_VERSION, config=self.config, extra=extra or {})
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(state, str(tmp), metadata={"avatarforcing": json.dumps(meta)})
        else:
            torch.save({**meta, "state_dict": state}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: os.PathLike | str, map_location="cpu") -> "WorldCodec":
        """Read a file written by ``save`` -> a frozen codec (eval mode, no gradients; call
        ``.train().requires_grad_(True)`` to fine-tune it)."""
        path = Path(path)
        if not path.is_file():
            raise AvatarForcingError(f"world codec file not found: {path}; train one with "
                                     "avatarforcing.world.codec.train_codec")
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                from safetensors.torch import load_file
                with safe_open(str(path), "pt") as f:
                    meta = json.loads((f.metadata() or {}).get("avatarforcing", "{}"))
                state = load_file(str(path), device=str(map_location))
            else:
                blob = torch.load(path, map_location=map_location, weights_only=True)
                meta = {k: v for k, v in blob.items() if k != "state_dict"} if isinstance(blob, dict) else {}
                state = blob.get("state_dict") if isinstance(blob, dict) else None
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
            raise AvatarForcingError(f"cannot read world codec file {path} ({type(e).__name__}: {e}); "
                                     "pass a file written by WorldCodec.save") from e
        if meta.get("format") != FORMAT or state is None:
            raise AvatarForcingError(f"{path} is not a world codec file (format {meta.get('format')!r}); "
                                     "pass a file written by WorldCodec.save")
        state = _upgrade_state(dict(state))
        cfg = meta["config"]
        model = cls(z_dim=cfg["z_dim"], width=cfg["width"], num_res=cfg["num_res"], widths=cfg["widths"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise AvatarForcingError(f"world codec file {path} does not match its config: missing keys "
                                     f"{sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
        model.extra = meta.get("extra", {})
        return model.eval().requires_grad_(False)          # a frozen codec, as WanVAE is used

    from_pretrained = load


def build_codec(cfg_vae) -> WorldCodec:
    """``vae.kind: world`` (registered in :mod:`avatarforcing.backends` by avatarforcing.world): the codec
    loaded from vae.path, or a random init of vae.z_dim (default 16) if it is null."""
    from ..config import resolve_path
    if cfg_vae.get("path"):
        return WorldCodec.load(resolve_path(cfg_vae["path"]))
    return WorldCodec(z_dim=int(cfg_vae.get("z_dim", 16)))


def _upgrade_state(state: dict) -> dict:
    """Files from before the decoder's per-position patch bias held a per-channel transposed-conv bias:
    the same function, as a constant patch."""
    old = state.pop("decoder.linear.bias", None)
    if old is not None and "decoder.patch_bias" not in state:
        state["decoder.patch_bias"] = old.reshape(1, -1, 1, 1).expand(1, -1, SPATIAL_RATIO, SPATIAL_RATIO).clone()
    return state


class StreamDecoder:
    """Decodes latents pushed in chunks ``[B, z, f, h, w]`` -> frames ``[B, 3, n, H, W]``."""

    def __init__(self, codec: WorldCodec):
        self.codec = codec
        self.started = False

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        self.codec._check_latents(latents)
        first = not self.started and latents.shape[2] > 0
        out = self.codec._decode_frames(latents, first=first)
        self.started = self.started or first
        return out


# ----------------------------------------------------------------------------------------------
# training data: a pool of rendered clips, groups sampled from it


class ClipPool:
    """uint8 clips [T, H, W, 3] (all the same H, W) from which training groups are sampled.

    With ``world_seed`` set, new clips can be rendered on the fly (``add_rendered``) so training keeps
    seeing new identities at a small, amortised cost."""

    def __init__(self, clips: Sequence[np.ndarray] = (), world_seed: int | None = None, seconds: float = 1.0,
                 size: int = 64, version: int = 1):
        self.clips: list[np.ndarray] = []
        self.world_seed = world_seed
        self.seconds = seconds
        self.size = size
        self.version = version
        self.next_index = 0
        for c in clips:
            self.add(c)

    def add(self, frames) -> None:
        frames = np.asarray(getattr(frames, "frames", frames))
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 1:
            raise AvatarForcingError(f"training clips must be uint8 frames [T, H, W, 3], got {frames.dtype} "
                                     f"{frames.shape}")
        _check_spatial(frames.shape[1], frames.shape[2], "training clip")
        if self.clips and frames.shape[1:] != self.clips[0].shape[1:]:
            raise AvatarForcingError(f"training clips differ in size ({frames.shape[1:3]} vs "
                                     f"{self.clips[0].shape[1:3]}); render them all at one size")
        self.clips.append(frames)

    def add_rendered(self, n: int = 1) -> None:
        from .dataset import clip_seed, generate_clip
        for _ in range(n):
            seed = clip_seed(self.world_seed, self.next_index)
            self.next_index += 1
            self.add(generate_clip(seed, self.seconds, self.size, self.version).frames)

    def __len__(self) -> int:
        return len(self.clips)

    def sample(self, batch: int, rng: np.random.Generator, crop: int | None = None,
               static_fraction: float = 0.2) -> torch.Tensor:
        """-> [batch, 3, 4, c, c] in [-1, 1]: 4 consecutive frames, or one frame repeated 4x (the first-frame
        latent's input) with probability ``static_fraction``; random crops aligned to 8 px when ``crop``."""
        H, W = self.clips[0].shape[1:3]
        out = np.empty((batch, TEMPORAL_RATIO, crop or H, crop or W, 3), np.uint8)
        for i in range(batch):
            clip = self.clips[rng.integers(len(self.clips))]
            T = len(clip)
            if T < TEMPORAL_RATIO or rng.random() < static_fraction:
                t = 0 if rng.random() < 0.5 else int(rng.integers(T))
                g = np.repeat(clip[t:t + 1], TEMPORAL_RATIO, 0)
            else:
                t = int(rng.integers(T - TEMPORAL_RATIO + 1))
                g = clip[t:t + TEMPORAL_RATIO]
            if crop:
                y = int(rng.integers((H - crop) // 8 + 1)) * 8
                x = int(rng.integers((W - crop) // 8 + 1)) * 8
                g = g[:, y:y + crop, x:x + crop]
            if rng.random() < 0.5:
                g = g[:, :, ::-1]                                              # horizontal flip
            out[i] = g
        return torch.from_numpy(out).permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def _heldout_videos(seed: int, n: int, seconds: float, size: int, version: int = 1) -> list[torch.Tensor]:
    """Clips from seeds no training run uses (a separate world seed), trimmed to 1 + 4k frames."""
    from .dataset import clip_seed, generate_clip
    out = []
    for i in range(n):
        frames = generate_clip(clip_seed(1_000_003 + seed, i), seconds, size, version).frames
        T = 1 + (len(frames) - 1) // TEMPORAL_RATIO * TEMPORAL_RATIO
        out.append(frames_to_tensor(frames[:T])[None])
    return out


@torch.no_grad()
def evaluate_codec(codec: WorldCodec, videos: Sequence[torch.Tensor]) -> float:
    """PSNR (dB, uint8, over all frames of all videos) of encode_video -> decode."""
    was = codec.training
    codec.eval()
    se, n = 0.0, 0
    for v in videos:
        rec = codec.decode(codec.encode_video(v))
        qa = ((rec.float().clamp(-1, 1) + 1) * 127.5).round()
        qb = ((v.float().clamp(-1, 1) + 1) * 127.5).round()
        se += float(((qa - qb) ** 2).sum())
        n += qa.numel()
    codec.train(was)
    return 10.0 * math.log10(255.0 ** 2 / max(se / n, 1e-12))


# ----------------------------------------------------------------------------------------------
# training


def train_codec(out_path: os.PathLike | str | None, steps: int = 2500, batch: int = 4, size: int = 64, seed: int = 0,
                clips: Sequence | None = None, log_every: int = 100, time_budget_s: float | None = None,
                lr: float = 2e-3, crop: int | None = None, z_dim: int = 16, width: int = 32, num_res: int = 2,
                widths: Sequence[int] | None = None,
                latent_noise: float = 0.02, latent_l2: float = 1e-4, l1_weight: float = 0.1,
                pool_clips: int = 64, pool_seconds: float = 0.6, pool_max: int = 1000, refresh_every: int = 2,
                eval_clips: int = 16, eval_seconds: float = 1.0, threads: int | None = 1,
                static_fraction: float = 0.2, channels_last: bool = True, pca_init: bool = True,
                codec: WorldCodec | None = None, version: int = 1, latent_scale: str = "channel") -> dict:
    """Train a WorldCodec on groups of frames of the synthetic world; save it to ``out_path`` (None: don't).

    Data: ``clips`` (Clip objects or uint8 [T, H, W, 3] arrays) if given, else a pool of ``pool_clips``
    clips of ``pool_seconds`` rendered with ``generate_clip`` from seeds ``clip_seed(seed, i)``; one new clip
    (a new identity) joins every ``refresh_every`` steps, the oldest leaves beyond ``pool_max``.  A sample is
    4 consecutive frames, or one frame repeated 4x (``static_fraction``: the first-frame latent's input),
    flipped at random; whole frames, or random ``crop`` x ``crop`` crops aligned to 8 px.
    Model: the linear 8x8 patch paths start at the PCA of the pool's patches (``pca_init``, ~26 dB alone),
    the conv nets learn the rest.  Loss: MSE + ``l1_weight`` * L1 on pixels in [-1, 1] + ``latent_l2`` *
    mean(z^2); the decoder sees z plus Gaussian noise of ``latent_noise`` x each channel's std.
    Adam, linear warm-up then cosine decay over the run's progress = max(step / steps, elapsed /
    ``time_budget_s``), so a time budget anneals too.  Runs on ``threads`` CPU threads (restored after).
    After training: ``latents_mean`` / ``latents_std`` from whole pool clips; PSNR (uint8, all frames) of
    encode_video -> decode on ``eval_clips`` clips of ``eval_seconds`` from seeds no training run uses
    (``heldout`` True), or on 4 of the given ``clips`` when clips were given (``heldout`` False).
    ``version`` picks the world the pool and the held-out clips are rendered from (1, 2 or 3, ``generate_clip``).
    ``latent_scale``: the normalisation of the latents (``WorldCodec.compute_latent_stats``: channel | global).

    Returns dict(psnr, seconds (total), steps, train_seconds, render_seconds, loss_first, loss_last (pixel
    MSE), params, heldout, pool_clips, path, codec (the trained WorldCodec, eval mode))."""
    args = {k: v for k, v in locals().items() if k != "threads"}
    old_threads = torch.get_num_threads()
    if threads:
        # one thread: these small convolutions gain little from a second one, and a thread team on a
        # shared, busy CPU stalls at its barriers (measured: 0.07 s/step on 1 thread, 0.5-2.8 s on 2)
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)                  # denormals slow CPU convolutions down by orders of magnitude
    try:
        return _train(**args)
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)


def _train(out_path, steps, batch, size, seed, clips, log_every, time_budget_s, lr, crop, z_dim, width, num_res,
           widths, latent_noise, latent_l2, l1_weight, pool_clips, pool_seconds, pool_max, refresh_every, eval_clips,
           eval_seconds, static_fraction, channels_last, pca_init, codec, version, latent_scale) -> dict:
    t_start = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    render_s = 0.0

    t0 = time.time()
    if clips is not None:
        pool = ClipPool(clips)
        if len(pool) == 0:
            raise AvatarForcingError("train_codec got an empty list of clips")
        refresh_every = 0
    else:
        pool = ClipPool(world_seed=seed, seconds=pool_seconds, size=size, version=version)
        pool.add_rendered(pool_clips)
    render_s += time.time() - t0
    H, W = pool.clips[0].shape[1:3]
    if crop and (crop % 8 or crop > min(H, W)):
        crop = None if crop > min(H, W) else crop
        if crop and crop % 8:
            raise AvatarForcingError(f"crop {crop} is not a multiple of 8")

    codec = codec or WorldCodec(z_dim=z_dim, width=width, num_res=num_res, widths=widths)
    codec.train()
    if channels_last:
        codec.to(memory_format=torch.channels_last)          # faster mkldnn convolutions on CPU
    if pca_init:
        kept = codec.init_linear(pool.sample(min(512, 64 * len(pool)), rng, crop=None, static_fraction=static_fraction))
        log.info("linear paths set to the PCA of the pool's 8x8 patches (%.4f of the variance kept)", kept)
    opt = torch.optim.Adam(codec.parameters(), lr=lr, betas=(0.9, 0.99))
    warmup = max(1, min(100, steps // 20))

    losses = []
    step = 0
    t_train = time.time()
    while step < steps:
        elapsed = time.time() - t_train
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
        progress = step / steps
        if time_budget_s:
            progress = max(progress, elapsed / time_budget_s)
        scale = min(1.0, (step + 1) / warmup) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr * scale

        if refresh_every and step and step % refresh_every == 0:
            t0 = time.time()
            pool.add_rendered(1)                                   # a new identity; the oldest goes
            if len(pool) > pool_max:
                pool.clips.pop(0)
            render_s += time.time() - t0

        x = pool.sample(batch, rng, crop=crop, static_fraction=static_fraction)
        z = codec.encode_groups(x)
        zn = z
        if latent_noise:
            std = z.detach().std((0, 2, 3), keepdim=True)              # per channel: scale-free
            zn = z + latent_noise * std * torch.randn_like(z)
        rec = codec.decode_groups(zn)
        mse = F.mse_loss(rec, x)
        loss = mse + l1_weight * F.l1_loss(rec, x) + latent_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        step += 1
        if log_every and (step % log_every == 0 or step == 1):
            recent = float(np.mean(losses[-log_every:]))
            log.info("codec step %d  mse %.5f  (~%.1f dB train)  lr %.2e  pool %d  %.0f s", step, recent,
                     10 * math.log10(4.0 / max(recent, 1e-12)), lr * scale, len(pool), time.time() - t_start)
    train_s = time.time() - t_train

    codec.eval()
    # latent statistics on whole training clips (trimmed to 1 + 4k frames)
    stats_videos = []
    for c in pool.clips[: min(len(pool), 64)]:
        T = 1 + (len(c) - 1) // TEMPORAL_RATIO * TEMPORAL_RATIO
        stats_videos.append(frames_to_tensor(c[:T])[None])
    codec.compute_latent_stats(stats_videos, scale=latent_scale)

    t0 = time.time()
    rendered = eval_clips and clips is None and H == W
    heldout = _heldout_videos(seed, eval_clips, eval_seconds, H, version) if rendered else []
    render_s += time.time() - t0
    value = evaluate_codec(codec, heldout) if heldout else evaluate_codec(codec, stats_videos[-4:])
    n_first = max(1, min(20, len(losses) // 10))
    result = dict(psnr=value, seconds=time.time() - t_start, steps=step, train_seconds=train_s,
                  render_seconds=render_s, loss_first=float(np.mean(losses[:n_first])) if losses else float("nan"),
                  loss_last=float(np.mean(losses[-n_first:])) if losses else float("nan"),
                  params=codec.num_parameters(), heldout=bool(heldout), pool_clips=len(pool))
    if out_path is not None:
        result["path"] = str(codec.save(out_path, extra={k: v for k, v in result.items() if k != "path"} |
                                        dict(size=H, seed=seed, batch=batch, crop=crop)))
    log.info("codec trained: %d steps, %.0f s, held-out PSNR %.2f dB", step, result["seconds"], value)
    result["codec"] = codec
    return result


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Train the synthetic world's latent codec")
    p.add_argument("out", help="output .pt or .safetensors")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=0, help="0 = whole frames")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--z-dim", type=int, default=16, help="latent channels")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--version", type=int, default=1, choices=(1, 2, 3), help="world version to train on")
    p.add_argument("--refresh-every", type=int, default=2, help="steps between new pool identities (0 = never)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    r = train_codec(a.out, steps=a.steps, batch=a.batch, size=a.size, seed=a.seed, crop=a.crop or None,
                    width=a.width, lr=a.lr, time_budget_s=a.time_budget, log_every=a.log_every, version=a.version,
                    refresh_every=a.refresh_every, z_dim=a.z_dim)
    r.pop("codec")
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
