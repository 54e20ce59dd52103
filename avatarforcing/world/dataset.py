"""Talking-face clips of the synthetic world, and a resumable on-disk dataset of them.

On disk (``write_world``), per clip ``clip_XXXXX``:
  .mp4   H.264 video at 25 fps with the speech muxed in (AAC)
  .wav   the speech, 16 kHz mono 16-bit (use this, not the mp4's lossy track, for training)
  .json  ground truth: identity parameters, mouth_open, head_pose, blink, envelope, settings
and ``index.csv`` with columns video, audio, caption (paths relative to the csv's folder).
The json is written last, so a clip is complete exactly when its json exists.
World v2 (``version=2``: :mod:`.speech_tts`, :mod:`.render_v2`) writes the same files; its json (format 2) has
the v2 identity, mouth shapes, visemes, phonemes, 6-d head poses and the light instead of v1's motion.
"""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import AvatarForcingError
from .render import Identity, Motion, render, sample_identity, sample_motion
from .speech import FPS, SAMPLE_RATE, num_video_frames, synth_speech

if TYPE_CHECKING:
    from .render_v2 import IdentityV2, MotionV2
    from .speech_tts import TTSClip

FORMAT_VERSION = 1              # v1's json; v2's and v3's (one layout) carry their world version instead
WORLD_VERSIONS = (1, 2, 3)      # 1: 64x64 flat faces; 2: world v2; 3: world v2 with a clip-long sway (render_v2)


def check_world_version(version: int, who: str = "the world") -> int:
    """``version`` if it is a world this package renders, else a one-line error."""
    if version not in WORLD_VERSIONS:
        raise AvatarForcingError(f"{who}: world version must be 1, 2 or 3 (world v2 with a sway), got {version}")
    return version


@dataclass
class Clip:
    frames: np.ndarray       # uint8 [T, H, W, 3]
    wav: np.ndarray          # float32 [N], 16 kHz
    identity: Identity
    motion: Motion
    envelope: np.ndarray     # float32 [T]
    seed: int
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE

    @property
    def caption(self) -> str:
        return self.identity.caption()


def clip_seed(world_seed: int, index: int) -> int:
    """Seed of clip ``index`` in the world made from ``world_seed``."""
    return int(np.random.SeedSequence([world_seed, index]).generate_state(1)[0])


@dataclass
class ClipV2:
    frames: np.ndarray       # uint8 [T, H, W, 3]
    wav: np.ndarray          # float32 [N], 16 kHz
    identity: "IdentityV2"
    motion: "MotionV2"
    speech: "TTSClip"        # visemes, phonemes, sentences, voice
    seed: int
    version: int = 2         # 3: world v3 (the head sways, :func:`.render_v2.sample_motion_v2`)
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE

    @property
    def envelope(self) -> np.ndarray:
        return self.speech.envelope

    @property
    def caption(self) -> str:
        return self.identity.caption()


def generate_clip(seed: int, seconds: float, size: int = 64, version: int = 1) -> Clip | ClipV2:
    """One talking clip: identity, speech and motion all drawn from ``seed``; ``version=2`` is world v2
    (espeak-ng speech with visemes, a turning, textured, lit head; see :mod:`.render_v2`), ``version=3`` world v2
    whose head sways with a clip-long period instead of turning at random (its pose follows from its past).

    Prefix-consistent: a shorter clip from the same seed is the start of a longer one."""
    if check_world_version(version) >= 2:
        return _generate_clip_v2(seed, seconds, size, version)
    speech = synth_speech(seconds, seed)
    T = num_video_frames(seconds)
    identity = sample_identity(seed)
    motion = sample_motion(T, seed, speech.envelope)
    frames = render(identity, motion.mouth_open, motion.head_pose, motion.blink, size=size)
    return Clip(frames=frames, wav=speech.wav, identity=identity, motion=motion,
                envelope=speech.envelope, seed=seed)


def _generate_clip_v2(seed: int, seconds: float, size: int, version: int = 2) -> ClipV2:
    from .render_v2 import render_v2, sample_identity_v2, sample_motion_v2
    from .speech_tts import synth_tts

    speech = synth_tts(seconds, seed)
    identity = sample_identity_v2(seed)
    motion = sample_motion_v2(len(speech.visemes), seed, speech.mouth, speech.visemes, sway=version == 3)
    frames = render_v2(identity, motion.mouth, motion.head_pose, motion.light, motion.blink, size=size)
    return ClipV2(frames=frames, wav=speech.wav, identity=identity, motion=motion, speech=speech, seed=seed,
                  version=version)


def sample_reference(seed: int, size: int = 64) -> np.ndarray:
    """Frame 0 of any clip made from ``seed`` (mouth closed, eyes open) -> uint8 [H, W, 3]."""
    return generate_clip(seed, 0.2, size).frames[0]


# ----------------------------------------------------------------------------------------------
# on disk


def _round(a, digits=5):
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


def ground_truth(clip: Clip, size: int, seconds: float, world_seed: int | None, index: int | None) -> dict:
    return dict(version=FORMAT_VERSION, seed=clip.seed, world_seed=world_seed, index=index, size=size,
                seconds=seconds, fps=clip.fps, sample_rate=clip.sample_rate, num_frames=len(clip.frames),
                caption=clip.caption, identity=clip.identity.to_dict(),
                mouth_open=_round(clip.motion.mouth_open), head_pose=_round(clip.motion.head_pose),
                blink=_round(clip.motion.blink), envelope=_round(clip.envelope))


def ground_truth_v2(clip: ClipV2, size: int, seconds: float, world_seed: int | None, index: int | None) -> dict:
    m, sp = clip.motion, clip.speech
    return dict(version=clip.version, seed=clip.seed, world_seed=world_seed, index=index, size=size,
                seconds=seconds, fps=clip.fps, sample_rate=clip.sample_rate, num_frames=len(clip.frames),
                caption=clip.caption, identity=clip.identity.to_dict(), mouth=_round(m.mouth),
                visemes=m.visemes.tolist(), head_pose=_round(m.head_pose), light=_round(m.light, 3),
                blink=_round(m.blink), envelope=_round(sp.envelope), sentences=sp.sentences, voice=sp.voice,
                phonemes=[[round(p.start, 5), round(p.end, 5), p.name, p.viseme] for p in sp.phonemes])


def load_ground_truth(json_path: os.PathLike | str) -> tuple[Identity, Motion, np.ndarray, dict]:
    """Read a clip's json -> (identity, motion, envelope [T], the whole dict)."""
    path = Path(json_path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarForcingError(f"cannot read ground truth {path} ({exc}); regenerate it with write_world") from None
    motion = Motion(mouth_open=np.asarray(d["mouth_open"], np.float32),
                    head_pose=np.asarray(d["head_pose"], np.float32).reshape(-1, 3),
                    blink=np.asarray(d["blink"], np.float32))
    return Identity.from_dict(d["identity"]), motion, np.asarray(d["envelope"], np.float32), d


def _clip_name(index: int) -> str:
    return f"clip_{index:05d}"


def _existing(out_dir: Path, index: int, settings: dict) -> dict | None:
    """The json of a complete clip made with the same settings; None if incomplete."""
    name = _clip_name(index)
    js = out_dir / f"{name}.json"
    if not (js.is_file() and (out_dir / f"{name}.mp4").is_file() and (out_dir / f"{name}.wav").is_file()):
        return None
    try:
        d = json.loads(js.read_text())
    except ValueError:
        return None
    made_with = {k: d.get(k) for k in settings}
    if made_with != settings:
        raise AvatarForcingError(f"{js} was made with {made_with}, not {settings}; "
                                 "use a new out_dir or the same settings")
    return d


def _write_clip(out_dir: Path, index: int, seconds: float, size: int, world_seed: int, mux_audio: bool,
                version: int = 1) -> str:
    from ..media import VideoWriter, write_wav  # media imports torch: keep `world` light to import

    name = _clip_name(index)
    clip = generate_clip(clip_seed(world_seed, index), seconds, size, version)
    truth = ground_truth_v2 if version >= 2 else ground_truth
    wav_path = out_dir / f"{name}.wav"
    write_wav(wav_path, clip.wav, clip.sample_rate)
    with VideoWriter(out_dir / f"{name}.mp4", clip.fps, audio_path=wav_path if mux_audio else None) as writer:
        writer.write(clip.frames)
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(truth(clip, size, seconds, world_seed, index)))
    os.replace(tmp, out_dir / f"{name}.json")                      # the clip is complete now
    return clip.caption


def write_world(out_dir: os.PathLike | str, num_clips: int, seconds: float = 8.0, size: int = 64,
                seed: int = 0, workers: int = 1, mux_audio: bool = True, log=None, version: int = 1) -> Path:
    """Write ``num_clips`` clips and ``index.csv`` into ``out_dir`` -> path of index.csv.

    Resumable: complete clips are kept (and must have been made with the same settings), missing
    or partial ones are (re)written. Clip i depends only on (seed, i, seconds, size, version)."""
    check_world_version(version, "write_world")
    if num_clips <= 0 or seconds <= 0:
        raise AvatarForcingError(f"write_world needs num_clips > 0 and seconds > 0, got {num_clips} and {seconds}")
    if size < 8 or size % 2:
        raise AvatarForcingError(f"write_world size must be an even number >= 8, got {size}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AvatarForcingError(f"cannot create {out_dir} ({exc.strerror}); choose a writable out_dir") from None
    settings = dict(version=version, world_seed=seed, size=size,
                    seconds=seconds)
    captions: dict[int, str] = {}
    todo = []
    for i in range(num_clips):
        done = _existing(out_dir, i, settings)
        if done is None:
            todo.append(i)
        else:
            captions[i] = done["caption"]
    if log and todo:
        log(f"world: writing {len(todo)} of {num_clips} clips to {out_dir}")
    args = [(out_dir, i, seconds, size, seed, mux_audio, version) for i in todo]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, caption in zip(todo, pool.map(_write_clip, *zip(*args))):
                captions[i] = caption
    else:
        for a in args:
            captions[a[1]] = _write_clip(*a)
    index = out_dir / "index.csv"
    tmp = out_dir / ".index.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "audio", "caption"])
        for i in range(num_clips):
            w.writerow([f"{_clip_name(i)}.mp4", f"{_clip_name(i)}.wav", captions[i]])
    os.replace(tmp, index)
    return index
