"""End-to-end inference: reference image + audio (+ prompt) -> video frames, streamed block by block.

    pipe = AvatarPipeline.from_config(load_config("configs/tiny.yaml"))
    for frames in pipe.stream("face.png", "speech.wav"):      # uint8 [B, n, H, W, 3]
        ...                                                  # n = 1 (reference), then 4*B per block
    pipe.generate("face.png", "speech.wav", "out.mp4")       # the same, written to an mp4 with audio

Per stream:
1. the reference image is resized (``inference.resize``: keep its aspect ratio within the area
   ``inference.height x width``, as the release does, or cover-crop to exactly that size) and VAE-encoded
   to latent frame 0; its decode is output frame 0 and it seeds the style anchor (docs/spec.md section 3);
2. :class:`~avatarforcing.audio.AudioFeed` serves per-latent-frame audio features to the sampler (latent
   frame 0 gets zeros, latent frame k >= 1 the rows of video frames 4k-3..4k): a file or whole waveform is
   encoded at once (``audio.file_features=offline``, as in training); a live iterable / queue of chunks is
   re-encoded each step with the right context that has arrived, so a block's features are final when
   it is emitted;
3. :class:`~avatarforcing.sampler.StreamingSampler` runs B_{L,N}; every emitted latent block is decoded
   at once by the streaming VAE decoder and yielded.

Length: ``num_blocks`` given -> exactly that many blocks (audio zero-padded or cut); otherwise the
stream runs until the audio ends: block i is started only if the audio reaches into it, i.e. has a row
for video frame 4iB+1, so a clip of T rows gives the whole blocks covering it (at least one).
State that grows with the stream is dropped as it ages (audio rows, window blocks, decoder cache), so
memory is flat on unbounded streams.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import AvatarForcingError
from .audio import AudioFeed, BatchAudio
from .model import WanDiT, build_model
from .profiling import NullProfiler
from .sampler import StreamingSampler
from .schedule import StreamStep, WindowSchedule
from .stream_state import CacheConfig, NoiseSource
from .units import LATENT_STRIDE

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent   # the checkout; shipped files: config.resource_path


# ----------------------------------------------------------------------------------------------
# device, dtype, config


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' -> cuda if available, else cpu.  Anything that cannot run here is a one-line error."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise AvatarForcingError(f"inference.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise AvatarForcingError(f"inference.device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AvatarForcingError(f"inference.device={name} requested but no CUDA GPU is available "
                                     "(or this torch is a CPU build); use inference.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AvatarForcingError(f"inference.device={name}: only {torch.cuda.device_count()} CUDA device(s) "
                                     f"here; use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def bf16_supported(device: torch.device) -> bool:
    """bf16 compute: every CPU torch build here; CUDA from Ampere (compute capability 8.0) on."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a GPU that supports it (the dtype the released weights were trained in), else fp32.

    fp16 is refused: Wan's activations overflow in fp16 (the release runs bf16)."""
    if isinstance(name, torch.dtype):
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(name, str(name))
    name = "auto" if name is None else str(name).lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else torch.float32
    if name in ("fp16", "float16", "half"):
        raise AvatarForcingError("inference.dtype=fp16 is not supported: the Wan DiT overflows in fp16 (the released "
                                 "weights run in bf16); use inference.dtype=bf16, or fp32 where bf16 is unsupported")
    if name not in _DTYPES:
        raise AvatarForcingError(f"inference.dtype '{name}' is not known; use auto, bf16 or fp32")
    dtype = _DTYPES[name]
    if dtype == torch.bfloat16 and not bf16_supported(device):
        gpu = torch.cuda.get_device_name(device)
        raise AvatarForcingError(f"inference.dtype=bf16 is not supported on {gpu} (needs compute capability >= 8.0); "
                                 "use inference.dtype=fp32")
    return dtype


def default_config_path() -> Path:
    """configs/demo.yaml (the synthetic-world demo model) if it exists, else configs/tiny.yaml."""
    from .config import resource_path

    demo = resource_path("configs/demo.yaml", required=False)
    return demo if demo.is_file() else resource_path("configs/tiny.yaml")


class BatchNoise:
    """Per-item noise with seeds ``seeds[i]``: batch item i equals a batch-1 stream with that seed."""

    def __init__(self, seeds: Sequence[int], device, dtype):
        self.sources = [NoiseSource(s, device, dtype) for s in seeds]

    def __call__(self, block: int, level: int, shape) -> torch.Tensor:
        one = (1, *shape[1:])
        return torch.cat([src(block, level, one) for src in self.sources])


# ----------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class AvatarPipeline:
    model: WanDiT
    vae: object                    # avatarforcing.vae.WanVAE
    audio_encoder: object          # avatarforcing.audio.AudioFeatureExtractor
    text_encoder: object           # avatarforcing.text encoder: .encode(list[str]) -> [B, text_len, text_dim]
    schedule: WindowSchedule
    cache_cfg: CacheConfig
    height: int = 480
    width: int = 832
    fps: int = 25
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    resize: str = "keep_aspect"    # reference image: keep_aspect (the release) | cover (resize + center crop)

    def __post_init__(self):
        from .media import RESIZE_MODES
        if self.resize not in RESIZE_MODES:
            raise AvatarForcingError(f"inference.resize is '{self.resize}'; use keep_aspect (the release) or cover")
        _, ph, pw = self.model.cfg.patch_size
        mh, mw = 8 * ph, 8 * pw                                        # 8x VAE x the DiT's spatial patch
        if self.height % mh or self.width % mw or self.height <= 0 or self.width <= 0:
            raise AvatarForcingError(
                f"inference size {self.height}x{self.width} is not a multiple of {mh}x{mw} (8x VAE x {ph}x{pw} DiT "
                f"patch); use e.g. inference.height={max(mh, round(self.height / mh) * mh)} "
                f"inference.width={max(mw, round(self.width / mw) * mw)}")
        z = int(getattr(self.vae, "z_dim", 16))
        if self.model.cfg.in_dim not in (2 * z + 1, z):
            raise AvatarForcingError(f"model.in_dim is {self.model.cfg.in_dim} but the VAE has {z} latent channels "
                                     f"(in_dim must be 2*{z}+1 = {2 * z + 1}, or {z} without reference channels); "
                                     "fix model.in_dim or vae.z_dim")
        feat = int(self.audio_encoder.feature_dim)
        if self.model.cfg.audio_dim != LATENT_STRIDE * feat:
            raise AvatarForcingError(
                f"model.audio_dim is {self.model.cfg.audio_dim} but the audio encoder gives {feat} features per video "
                f"frame ({LATENT_STRIDE} x {feat} = {LATENT_STRIDE * feat} per latent frame); set model.audio_dim={LATENT_STRIDE * feat} "
                "or change audio.encoder")
        if int(self.audio_encoder.fps) != int(self.fps):
            raise AvatarForcingError(f"inference.fps is {self.fps} but the audio encoder runs at {self.audio_encoder.fps} "
                                     "frames per second; set inference.fps to it")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, checkpoint: str | os.PathLike | None = None) -> "AvatarPipeline":
        """Build every component from a loaded config (avatarforcing.config.load_config)."""
        from .audio import Wav2Vec2Features, build_audio_encoder
        from .checkpoint import load_dit
        from .config import resolve_path
        from .lowvram import apply_memory_options
        from .text import build_text_encoder
        from .vae import build_vae

        inf = cfg.inference
        device = resolve_device(inf.device)
        dtype = resolve_dtype(inf.dtype, device)
        schedule = WindowSchedule.from_config(cfg.schedule)
        cache_cfg = CacheConfig.from_config(cfg.cache)

        # Random initialisations (no checkpoint / vae.path, tiny wav2vec2) are seeded from cfg.seed, each
        # component on its own, in a forked RNG: same seed, same model; the callers' RNG state is untouched.
        seed = int(cfg.get("seed", 0) or 0)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_model(cfg.model)
        checkpoint = checkpoint or inf.checkpoint
        if checkpoint:
            checkpoint = resolve_path(checkpoint)
            if not Path(checkpoint).exists():
                raise AvatarForcingError(f"checkpoint not found: {checkpoint}; pass an existing model.pt / "
                                         ".safetensors file or a Wan2.1 folder")
            report = load_dit(model, checkpoint, use_ema=bool(inf.use_ema), strict=True)
            log.info("loaded DiT weights: %s", report)
        else:
            log.warning("no DiT checkpoint configured (inference.checkpoint / --checkpoint): using randomly "
                        "initialised weights (%d layers, dim %d); the video will not show a talking face",
                        model.cfg.num_layers, model.cfg.dim)
        model = model.to(device, dtype).eval().requires_grad_(False)
        if inf.get("compile", False):           # lazy: compiles at the stream's first steady-state step
            model.compile_streaming(str(inf.get("compile_mode", "default")))

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = build_vae(cfg.vae)
        if not cfg.vae.path:
            log.warning("no VAE weights configured (vae.path): using a randomly initialised VAE (base_dim %d)",
                        cfg.vae.base_dim)
        vae = vae.to(device, dtype).eval().requires_grad_(False)

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            audio_encoder = build_audio_encoder(cfg.audio).to(device).eval()
        if isinstance(audio_encoder, Wav2Vec2Features):   # weights in the run dtype (mel features stay fp32)
            audio_encoder.model.to(dtype)
        text_encoder = build_text_encoder(cfg.text, int(cfg.model.text_dim), int(cfg.model.text_len), dtype=dtype)
        text_encoder = text_encoder.to(device)
        apply_memory_options(model, vae, audio_encoder, text_encoder, inf, device)   # quantize, offload, low_vram
        return cls(model, vae, audio_encoder, text_encoder, schedule, cache_cfg, int(inf.height), int(inf.width),
                   int(inf.fps), device, dtype, str(inf.resize))

    def replace(self, **changes) -> "AvatarPipeline":
        """A copy sharing the components, e.g. ``pipe.replace(schedule=...)`` for the L x N sweep."""
        return replace(self, **changes)

    # ---- lengths -------------------------------------------------------------------------------
    @property
    def block_video_frames(self) -> int:
        return LATENT_STRIDE * self.schedule.B

    def video_frames(self, num_blocks: int) -> int:
        """1 (reference) + 4B per block."""
        return 1 + self.block_video_frames * num_blocks

    def audio_video_frames(self, num_samples: int) -> int:
        """Video frames the audio drives: 1 + its 25 fps frames (row convention of avatarforcing/audio.py)."""
        return 1 + self.audio_encoder.num_audio_frames(num_samples)

    def blocks_for_frames(self, video_frames: int) -> int:
        """Whole blocks covering ``video_frames`` (counting the reference frame); at least one."""
        return self.schedule.blocks_for_video_frames(video_frames)

    # ---- conditioning --------------------------------------------------------------------------
    def load_images(self, images: Sequence) -> torch.Tensor:
        """Paths / arrays / PIL images -> [B, 3, H, W] in [-1, 1], sized by ``inference.resize``.

        A float tensor [3, H, W] (channels first, H and W multiples of 16) is taken as already loaded by
        ``media.load_image``; images are given channels last."""
        from .media import load_image

        out = []
        for img in images:
            if (isinstance(img, torch.Tensor) and img.is_floating_point() and img.ndim == 3 and img.shape[0] == 3
                    and img.shape[1] % 16 == 0 and img.shape[2] % 16 == 0):
                out.append(img.float())          # already loaded by load_image
            else:
                out.append(load_image(img, self.height, self.width, self.resize))
        sizes = sorted({tuple(x.shape[1:]) for x in out})
        if len(sizes) > 1:
            raise AvatarForcingError(f"the reference images of one batch get different sizes {sizes} under "
                                     "inference.resize=keep_aspect; use inference.batch_size=1 or inference.resize=cover")
        return torch.stack(out)

    @torch.no_grad()
    def encode_reference(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> reference latent [B, z, 1, h, w]."""
        return self.vae.encode_image(images.to(self.device, self.dtype))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(prompts)).to(self.device, self.dtype)

    # ---- streaming -----------------------------------------------------------------------------
    def _batch(self, image, audio_source, prompt, seed):
        """Normalise single / batched arguments to per-item lists."""
        batched = isinstance(image, (list, tuple)) or (isinstance(image, torch.Tensor) and image.ndim == 4)
        images = list(image) if batched else [image]
        n = len(images)
        if n == 0:
            raise AvatarForcingError("no reference image given")
        if batched:
            if not isinstance(audio_source, (list, tuple)) or len(audio_source) != n:
                raise AvatarForcingError(f"{n} images need a list of {n} audio sources (one per image)")
            audios = list(audio_source)
        else:
            audios = [audio_source]
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt or ""] * n
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(n)]
        if len(prompts) != n or len(seeds) != n:
            raise AvatarForcingError(f"batch of {n} images needs {n} prompts and seeds (or a single one)")
        return images, audios, prompts, seeds

    def _adaptive_plan(self, audio: BatchAudio) -> Iterator[StreamStep]:
        """The schedule's unbounded plan until the audio ends, then the drain of the right length.

        Block i enters the window only if the audio reaches into it (a row for video frame 4iB+1)."""
        sch = self.schedule
        for i, step in enumerate(sch.plan(None)):
            if not audio.reaches(self.block_video_frames * i + 1):
                n = max(i, 1)
                if audio.received < self.video_frames(1):
                    log.info("note: the audio covers %d video frame(s), less than one block (%d frames); "
                             "generating one block", audio.received, self.video_frames(1))
                yield from itertools.islice(sch.plan(n), i, None)
                return
            yield step

    @torch.no_grad()
    def stream_latents(self, image, audio_source, prompt="", seed=0, num_blocks: int | None = None,
                       profiler=None) -> Iterator[tuple[int, torch.Tensor]]:
        """The latent stream without decoding: first ``(-1, ref_latent [B, z, 1, h, w])``, then
        ``(block, x0 [B, z, B, h, w])`` for every emitted block, in order."""
        profiler = profiler or NullProfiler()
        images, audios, prompts, seeds = self._batch(image, audio_source, prompt, seed)
        pixels = self.load_images(images)
        ref = self.encode_reference(pixels)
        text = self.encode_prompts(prompts)
        chunk = max(1, round(self.audio_encoder.chunk_seconds * self.audio_encoder.sample_rate))
        audio = BatchAudio([AudioFeed(self.audio_encoder, src, chunk, profiler) for src in audios])
        noise = BatchNoise(seeds, self.device, self.dtype)
        plan = self._adaptive_plan(audio) if num_blocks is None else None   # live: drain once the audio ends
        sampler = StreamingSampler(self.model, self.schedule, self.cache_cfg, ref, text, audio=audio, noise=noise,
                                   num_blocks=num_blocks, plan=plan)
        yield -1, ref
        while True:
            profiler.next_step()
            with profiler.part("step"):
                out = sampler.step()
            if out is None:
                profiler.next_step()
                return
            if out["emitted"] is not None:
                yield out["emitted"]

    @torch.no_grad()
    def stream(self, image, audio_source, prompt="", seed=0, num_blocks: int | None = None,
               profiler=None) -> Iterator[np.ndarray]:
        """Generate video, yielding uint8 frame blocks [B, n, H, W, 3] as soon as they are decoded.

        image: a path / array / tensor, or a list of them (a batch; then ``audio_source`` is a list too);
        audio_source: path, waveform [N] at 16 kHz, a live iterable / ``queue.Queue`` of chunks (None ends
        a queue), or None (silence); prompt / seed: one or one per item (item i defaults to seed + i);
        num_blocks: None = as many whole blocks as the audio covers (at least one).
        The first yield is the reference frame (n = 1), then 4B frames per block."""
        from .vae import to_uint8

        profiler = profiler or NullProfiler()
        decoder = self.vae.stream_decoder()
        for block, latents in self.stream_latents(image, audio_source, prompt, seed, num_blocks, profiler):
            with profiler.part("vae"):
                frames = decoder.push(latents.to(self.dtype))      # [B, 3, n, H, W] in [-1, 1]
                frames = _as_numpy(to_uint8(frames))                # [B, n, H, W, 3]
            yield frames

    # ---- files ---------------------------------------------------------------------------------
    def generate(self, image, audio_path, output, prompt="", seed=0, duration: float | None = None,
                 progress: bool = True, num_blocks: int | None = None):
        """Write an mp4 (H.264, the input audio muxed as AAC) and return its path.

        Length: ``num_blocks`` if given, else ``duration`` seconds rounded up to whole blocks, else the
        whole blocks covering the audio.  Frames are written as they are produced; nothing is left at
        ``output`` on failure.  Lists of images / audio paths / outputs generate a batch (-> list of paths);
        each video gets its own length, the batch runs as long as the longest."""
        from tqdm import tqdm

        from .media import VideoWriter, audio_num_samples

        images, audio_paths, prompts, seeds = self._batch(image, audio_path, prompt, seed)
        outputs = list(output) if isinstance(output, (list, tuple)) else [output]
        if len(outputs) != len(images):
            raise AvatarForcingError(f"{len(images)} images need {len(images)} output paths")
        pixels = self.load_images(images)                      # fail fast on bad images
        samples = [audio_num_samples(p, self.audio_encoder.sample_rate) for p in audio_paths]   # headers only
        lengths = [self._num_blocks(n, p, duration, num_blocks) for n, p in zip(samples, audio_paths)]
        total = max(lengths)

        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(VideoWriter(o, self.fps, audio_path=a)) for o, a in zip(outputs, audio_paths)]
            bar = stack.enter_context(tqdm(total=total, unit="block", disable=not progress, desc="generating",
                                           dynamic_ncols=True, leave=False))
            blocks_done = -1                                   # the first yield is the reference frame
            for frames in self.stream(list(pixels), audio_paths, prompts, seeds, num_blocks=total):
                for writer, frames_i, n_i in zip(writers, frames, lengths):
                    if blocks_done < n_i:
                        writer.write(frames_i)
                if blocks_done >= 0:
                    bar.update(1)
                blocks_done += 1
        paths = [Path(o) for o in outputs]
        return paths if isinstance(output, (list, tuple)) else paths[0]

    def _num_blocks(self, num_samples: int, name, duration: float | None, num_blocks: int | None) -> int:
        """Blocks of one video, with a one-line note where the request is rounded."""
        if num_blocks is not None:
            if num_blocks < 1:
                raise AvatarForcingError(f"number of blocks must be >= 1, got {num_blocks}")
            return int(num_blocks)
        if duration is not None:
            if duration <= 0:
                raise AvatarForcingError(f"duration must be positive, got {duration} s")
            frames = max(1, math.ceil(duration * self.fps - 1e-6))
            n = self.blocks_for_frames(frames)
            if self.video_frames(n) != frames:
                log.info("note: %.2f s (%d frames) is not a whole number of blocks (1 + %d k frames); rounded up to "
                         "%d block(s) = %d frames (%.2f s)", duration, frames, self.block_video_frames, n,
                         self.video_frames(n), self.video_frames(n) / self.fps)
            return n
        frames = self.audio_video_frames(num_samples)
        n = self.blocks_for_frames(frames)
        if frames < self.video_frames(1):
            log.info("note: audio %s is %.2f s, shorter than one block (%.2f s); generating one block (%d frames)",
                     name, num_samples / self.audio_encoder.sample_rate, self.video_frames(1) / self.fps,
                     self.video_frames(1))
        return n


def _as_numpy(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    return np.asarray(frames, dtype=np.uint8)
