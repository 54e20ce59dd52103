"""Wan2.1 VAE: video <-> normalized latents (8x spatial, 4x temporal), plus a streaming decoder.

A thin wrapper around diffusers' `AutoencoderKLWan`. Latents are normalized per channel,
(mu - latents_mean) / latents_std, which is what the DiT sees; `decode` undoes it.
A video of 1 + 4k frames has 1 + k latent frames; latent frame 0 decodes to 1 video frame and every
later one to 4.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import AvatarForcingError

WAN_VAE_FILE = "Wan2.1_VAE.pth"
VAE_HINT = f"pass {WAN_VAE_FILE}, the Wan2.1 folder holding it, or a diffusers AutoencoderKLWan folder"


# ----------------------------------------------------------------------------------------------
# checkpoint layouts


def diffusers_to_wan_key(key: str) -> str:
    """diffusers AutoencoderKLWan parameter name -> original Wan2.1 VAE name.

    Inverse of diffusers' `convert_wan_vae_to_diffusers` (used for error messages and test checkpoints)."""
    resnet = [("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
              ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")]

    def res(name: str) -> str:
        for new, old in resnet:
            if name.startswith(new):
                return old + name[len(new):]
        return name

    rules = [
        (r"quant_conv\.(.*)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(.*)", lambda m: f"conv2.{m[1]}"),
        (r"(encoder|decoder)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(encoder|decoder)\.norm_out\.(.*)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(.*)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{res(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.(.*)", lambda m: f"encoder.downsamples.{m[1]}.{res(m[2])}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{res(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"),
    ]
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return fn(m)
    return key


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a checkpoint
        raise AvatarForcingError(f"cannot read VAE checkpoint {path} ({type(exc).__name__}); {VAE_HINT}") from None
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _short(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return str(keys[:n])[:-1] + (f", ... {len(keys) - n} more]" if len(keys) > n else "]")


def _load_strict(sd: dict, source: Path, config: dict | None = None):
    """State dict (original Wan or diffusers names) -> AutoencoderKLWan; every key must match."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    original = any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) for k in sd)
    if original:
        sd = convert_wan_vae_to_diffusers(sd)
    name = diffusers_to_wan_key if original else (lambda k: k)
    if config is None:  # infer the architecture from the tensor shapes
        needed = ["encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight"]
        missing = [name(k) for k in needed if k not in sd]
        if missing:
            raise AvatarForcingError(f"{source.name} is not a Wan VAE checkpoint: missing keys {missing}; {VAE_HINT}")
        base_dim = sd["encoder.conv_in.weight"].shape[0]
        decoder_base_dim = sd["decoder.conv_in.weight"].shape[0] // 4  # dim_mult [1, 2, 4, 4]
        config = dict(base_dim=base_dim, z_dim=sd["post_quant_conv.weight"].shape[0],
                      decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim)
    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise AvatarForcingError(
            f"{source.name} does not match the Wan VAE layout: missing keys {_short(map(name, missing))}, "
            f"unexpected keys {_short(map(name, unexpected))}; {VAE_HINT}")
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise AvatarForcingError(f"{source.name}: tensor shapes do not match the Wan VAE "
                                 f"({str(exc).splitlines()[-1].strip()}); {VAE_HINT}") from None
    return model


# ----------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE with latent normalization. Inputs/outputs in [-1, 1], layout [B, C, T, H, W]."""

    spatial_ratio = 8
    temporal_ratio = 4
    decode_frames_per_call = 0   # streaming decoder default: 0 = a block per call, 1 = one latent frame (low VRAM)
    decode_offload_cache = False  # streaming decoder default: park its causal cache on the CPU between pushes

    def __init__(self, model, latents_mean=None, latents_std=None):
        super().__init__()
        if model.config.get("patch_size") is not None:
            raise AvatarForcingError("only the Wan2.1 VAE (no patchify) is supported; pass Wan2.1_VAE.pth")
        self.model = model.eval().requires_grad_(False)
        z = model.config.z_dim
        mean = self._stats(latents_mean, model.config.get("latents_mean"), z, 0.0, "latents_mean")
        std = self._stats(latents_std, model.config.get("latents_std"), z, 1.0, "latents_std")
        # plain float32 tensors, not buffers: `.to(bf16)` of the module must not round the statistics
        self.latents_mean, self.latents_std = mean.view(1, z, 1, 1, 1), std.view(1, z, 1, 1, 1)

    @staticmethod
    def _stats(given, from_config, z: int, fill: float, name: str) -> torch.Tensor:
        """Config value > the checkpoint's (diffusers default = Wan2.1 for z_dim 16) > zeros / ones."""
        if given is not None:
            given = [float(v) for v in given]
            if len(given) != z:
                raise AvatarForcingError(f"vae.{name} has {len(given)} values but z_dim is {z}; give {z} values or null")
            return torch.tensor(given)
        if from_config is not None and len(from_config) == z:
            return torch.tensor([float(v) for v in from_config])
        return torch.full((z,), fill)

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg_vae) -> "WanVAE":
        """Random init at cfg.base_dim / cfg.z_dim (tiny VAEs for tests and the synthetic world)."""
        from diffusers import AutoencoderKLWan
        model = AutoencoderKLWan(base_dim=int(cfg_vae.get("base_dim", 96)), z_dim=int(cfg_vae.get("z_dim", 16)))
        return cls(model, cfg_vae.get("latents_mean"), cfg_vae.get("latents_std"))

    @classmethod
    def from_pretrained(cls, path, latents_mean=None, latents_std=None) -> "WanVAE":
        """`Wan2.1_VAE.pth` (original names, converted with diffusers' converter), a folder holding it,
        or a diffusers AutoencoderKLWan folder (or a pipeline folder with `vae/`). Keys are checked strictly."""
        from diffusers import AutoencoderKLWan
        path = Path(path)
        config = None
        if path.is_dir():  # the Wan2.1 folder (its config.json is the DiT's), a pipeline folder or a VAE folder
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if (path / WAN_VAE_FILE).is_file() or not (folder / "config.json").is_file():
                path = path / WAN_VAE_FILE
            else:
                config = dict(AutoencoderKLWan.load_config(str(folder)))
                if config.get("_class_name") not in (None, "AutoencoderKLWan"):
                    raise AvatarForcingError(f"{folder / 'config.json'} describes a {config['_class_name']}, "
                                             f"not a Wan VAE; {VAE_HINT}")
                files = [folder / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
                path = next((f for f in files if f.is_file()), files[0])
        if not path.is_file():
            raise AvatarForcingError(f"VAE checkpoint not found: {path}; {VAE_HINT}")
        model = _load_strict(_read_state_dict(path), path, config)
        return cls(model, latents_mean, latents_std)

    # -- properties -------------------------------------------------------------------------

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """encoder mean -> DiT latents (float32)."""
        return (mu.float() - self.latents_mean.to(mu.device)) / self.latents_std.to(mu.device)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents -> VAE latents (float32)."""
        return latents.float() * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)

    # -- encode / decode --------------------------------------------------------------------

    def _check_pixels(self, x: torch.Tensor, what: str) -> None:
        h, w = x.shape[-2:]
        if x.shape[1] != 3 or h % self.spatial_ratio or w % self.spatial_ratio:
            raise AvatarForcingError(f"{what} has shape {tuple(x.shape)}; need 3 channels and H, W multiples of "
                                     f"{self.spatial_ratio}")

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalized latents [B, z, 1 + k, H/8, W/8]."""
        if video.ndim != 5:
            raise AvatarForcingError(f"encode_video expects [B, 3, T, H, W], got {tuple(video.shape)}")
        self._check_pixels(video, "video")
        t = video.shape[2]
        if (t - 1) % self.temporal_ratio:
            raise AvatarForcingError(f"video has {t} frames; the VAE needs 1 + 4k frames (e.g. {1 + 4 * ((t - 1) // 4)})")
        mu = self.model.encode(video.to(self.device, self.dtype)).latent_dist.mean
        return self.normalize(mu)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> normalized latents [B, z, 1, H/8, W/8]."""
        if image.ndim != 4:
            raise AvatarForcingError(f"encode_image expects [B, 3, H, W], got {tuple(image.shape)}")
        return self.encode_video(image[:, :, None])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents [B, z, F, h, w] -> video [B, 3, 1 + 4 (F - 1), 8h, 8w] in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise AvatarForcingError(f"decode expects latents [B, {self.z_dim}, F, h, w], got {tuple(latents.shape)}")
        z = self.denormalize(latents.to(self.device)).to(self.dtype)
        return self.model.decode(z).sample.float()

    def stream_decoder(self, frames_per_call: int | None = None, offload_cache: bool | None = None) -> "StreamingDecoder":
        """Defaults (None): ``self.decode_frames_per_call`` and ``self.decode_offload_cache`` (set by low_vram)."""
        return StreamingDecoder(self, self.decode_frames_per_call if frames_per_call is None else frames_per_call,
                                self.decode_offload_cache if offload_cache is None else offload_cache)


class StreamingDecoder:
    """Decode latent blocks as they are produced, keeping the VAE's causal cache between calls.

    Equals `WanVAE.decode` of all latents at once (docs/spec.md section 8). Holds its own feature cache, so
    several streams (and one-shot decodes) can use the same VAE.

    Low-VRAM options (the output is the same):
    ``frames_per_call`` > 0 runs the decoder on that many latent frames at a time (1 = one latent frame,
    4 video frames, per call: activations 1/B of a block's); 0 = a pushed block at once.
    ``offload_cache`` parks the causal cache (2 frames per causal conv, 1.8 GiB at 480x832) in pinned host
    memory between pushes, so that it does not sit on the GPU while the DiT runs."""

    def __init__(self, vae: WanVAE, frames_per_call: int = 0, offload_cache: bool = False):
        self.vae = vae
        self.frames_per_call = max(0, int(frames_per_call))
        self.offload_cache = bool(offload_cache)
        self._feat_map = [None] * vae.model._cached_conv_counts["decoder"]
        self._host: dict[int, torch.Tensor] = {}     # parking buffers of the cache, reused every push
        self._first = True

    def _park(self) -> None:
        for i, t in enumerate(self._feat_map):
            if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
                buf = self._host.get(i)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = self._host[i] = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
                buf.copy_(t)
                self._feat_map[i] = buf

    def _restore(self, device: torch.device) -> None:
        for i, t in enumerate(self._feat_map):
            if isinstance(t, torch.Tensor) and t.device != device:
                self._feat_map[i] = t.to(device, non_blocking=True)

    def _decode(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        return self.vae.model.decoder(x, feat_cache=self._feat_map, feat_idx=[0], first_chunk=first)

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """normalized latents [B, z, f, h, w] -> frames [B, 3, n, 8h, 8w] in [-1, 1];
        n = 4f, or 1 + 4 (f - 1) for the stream's first block."""
        vae = self.vae
        x = vae.model.post_quant_conv(vae.denormalize(latents.to(vae.device)).to(vae.dtype))  # 1x1x1 conv
        self._restore(x.device)
        out = []
        if self._first and x.shape[2] > 0:  # the first chunk must be exactly one latent frame
            out.append(self._decode(x[:, :, :1], first=True))
            x, self._first = x[:, :, 1:], False
        if x.shape[2] > 0:
            n = self.frames_per_call
            out.extend(self._decode(part, first=False) for part in (x.split(n, dim=2) if n > 0 else [x]))
        if self.offload_cache:
            self._park()
        if not out:
            b, _, _, h, w = latents.shape
            return torch.zeros(b, 3, 0, h * vae.spatial_ratio, w * vae.spatial_ratio, device=vae.device)
        return torch.cat(out, dim=2).clamp(-1.0, 1.0).float()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Video in [-1, 1], [B, 3, T, H, W] -> uint8 numpy [B, T, H, W, 3] ([3, T, H, W] -> [T, H, W, 3])."""
    x = ((frames.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-4, -1).cpu().numpy()


def build_vae(cfg_vae):
    """`vae:` config section -> the latent codec.

    kind wan (default): WanVAE loaded from vae.path, or a random init of base_dim / z_dim if it is null.
    Any other kind: the factory registered for it in :mod:`avatarforcing.backends` (e.g. ``world``, the
    synthetic world's light codec, registered by avatarforcing.world and imported on demand), same interface."""
    from .backends import vae_factory
    return vae_factory(cfg_vae.get("kind", "wan"))(cfg_vae)


def _build_wan_vae(cfg_vae):
    """``vae.kind: wan``: WanVAE from vae.path, or a random init of base_dim / z_dim if it is null."""
    if cfg_vae.get("path"):
        vae = WanVAE.from_pretrained(cfg_vae["path"], cfg_vae.get("latents_mean"), cfg_vae.get("latents_std"))
    else:
        vae = WanVAE.from_config(cfg_vae)
    frames = cfg_vae.get("frames_per_decode", 1)
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 0:
        raise AvatarForcingError(f"vae.frames_per_decode is {frames!r}; use 1 (one latent frame per decoder call, "
                                 "the default), another positive number, or 0 (a whole block per call)")
    vae.decode_frames_per_call = frames
    return vae


def _register_wan() -> None:
    from .backends import register_vae
    register_vae("wan", _build_wan_vae)


_register_wan()

