"""Synthetic speech: syllable bursts of a formant-filtered harmonic voice, with phrase pauses.

The loudness that drives the avatar's mouth is :func:`speech_envelope`, a fixed function of the
waveform. The ground-truth ``SpeechClip.envelope`` *is* that function applied to the synthesized
wave, so the envelope a metric recomputes from any audio matches what the renderer was driven by.

Clips are prefix-consistent: the first s seconds of a longer clip equal the clip of length s
made from the same seed (the envelope's last two frames excepted: they see past the end).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

from .. import AvatarForcingError

SAMPLE_RATE = 16000
FPS = 25

# Loudness model: RMS above a noise floor, compressed by a power law (Stevens' law for loudness).
_OUTPUT_GAIN = 0.2          # RMS of a full-amplitude vowel
_ENV_FLOOR = 0.003          # RMS treated as silence (the background noise sits below it)
_ENV_REF = 0.2              # RMS mapped to envelope 1
_ENV_EXPONENT = 0.6

# Vowel formants (F1, F2, F3) in Hz, for a, e, i, o, u.
_VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010],
                    [570, 840, 2410], [300, 870, 2240]], dtype=np.float64)
_FORMANT_BW = np.array([90.0, 110.0, 170.0])
_FORMANT_GAIN = np.array([1.0, 0.7, 0.35])


@dataclass
class SpeechClip:
    wav: np.ndarray          # float32 [N] in [-1, 1]
    envelope: np.ndarray     # float32 [T] in [0, 1], one value per video frame
    sample_rate: int = SAMPLE_RATE
    fps: int = FPS

    @property
    def seconds(self) -> float:
        return len(self.wav) / self.sample_rate


def num_video_frames(seconds: float, fps: int = FPS) -> int:
    return int(round(seconds * fps))


def speech_envelope(wav: np.ndarray, sample_rate: int = SAMPLE_RATE, fps: int = FPS,
                    num_frames: int | None = None) -> np.ndarray:
    """Per-video-frame loudness in [0, 1] of a mono waveform -> float32 [T].

    Frame t covers the time span [t/fps, (t+1)/fps); its value is the Hann-weighted RMS over two
    frame lengths centred on the span, mapped by ((rms - floor) / (ref - floor)) ** 0.6 and
    clipped, then smoothed by a [1, 2, 1] / 4 kernel. ``num_frames`` defaults to round(len*fps/sr);
    audio shorter than the video is treated as silence.
    """
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise AvatarForcingError(f"speech_envelope needs mono audio [N], got shape {wav.shape}; downmix first")
    if num_frames is None:
        num_frames = int(round(len(wav) * fps / sample_rate))
    if num_frames <= 0:
        return np.zeros(0, dtype=np.float32)
    hop = sample_rate / fps
    win = np.hanning(int(round(2 * hop)) + 2)[1:-1]
    win /= win.sum()
    power = fftconvolve(wav ** 2, win, mode="same") if len(wav) else np.zeros(0)
    power = np.maximum(power, 0.0)                                   # fft round-off
    centres = np.floor((np.arange(num_frames) + 0.5) * hop).astype(np.int64)
    rms = np.zeros(num_frames)
    inside = centres < len(power)
    rms[inside] = np.sqrt(power[centres[inside]])
    env = np.clip((rms - _ENV_FLOOR) / (_ENV_REF - _ENV_FLOOR), 0.0, 1.0) ** _ENV_EXPONENT
    padded = np.pad(env, 1, mode="edge")
    env = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return env.astype(np.float32)


def _syllable_plan(seconds: float, rng: np.random.Generator) -> list[dict]:
    """Phrases of syllables at 3-6 Hz separated by pauses; starts with a short silence."""
    syllables = []
    t = rng.uniform(0.15, 0.45)                       # lead-in silence: frame 0 has a closed mouth
    while t < seconds:
        phrase_end = t + rng.uniform(0.8, 3.0)
        rate = rng.uniform(3.0, 6.0)                  # syllables per second in this phrase
        phrase_pitch = rng.uniform(0.9, 1.15)
        n_in_phrase = 0
        while t < phrase_end:
            dur = rng.uniform(0.6, 1.4) / rate
            syllables.append(dict(
                start=t, dur=dur,
                nucleus=rng.uniform(0.6, 0.9),        # voiced fraction of the syllable
                amp=rng.uniform(0.45, 1.0),
                shape=rng.uniform(0.6, 1.6),          # exponent of the sin-shaped amplitude
                pitch=phrase_pitch * rng.uniform(0.88, 1.15) * (1.0 - 0.04 * n_in_phrase / 4),
                vowel=int(rng.integers(len(_VOWELS))),
                fricative=rng.uniform() < 0.3,
                fric_dur=rng.uniform(0.04, 0.09),
                fric_amp=rng.uniform(0.08, 0.2),
            ))
            t += dur
            n_in_phrase += 1
        t += rng.uniform(0.2, 0.9)                    # pause between phrases
    return syllables


def synth_speech(seconds: float, seed: int, sample_rate: int = SAMPLE_RATE) -> SpeechClip:
    """Speech-like audio of ``seconds`` length, deterministic from ``seed``."""
    if not seconds or seconds <= 0:
        raise AvatarForcingError(f"synth_speech needs seconds > 0, got {seconds}; pass a positive duration")
    if sample_rate < 8000:
        raise AvatarForcingError(f"synth_speech needs sample_rate >= 8000, got {sample_rate}; use 16000")
    plan_rng = np.random.default_rng([seed, 1])
    noise_rng = np.random.default_rng([seed, 2])
    fric_rng = np.random.default_rng([seed, 3])
    voice_rng = np.random.default_rng([seed, 4])
    background_rng = np.random.default_rng([seed, 5])

    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate                                       # [N] seconds
    f0_base = voice_rng.uniform(95.0, 230.0)                             # the speaker's pitch
    syllables = _syllable_plan(seconds + 2.0, plan_rng)   # planned past the end: prefix-consistent

    amp = np.zeros(n)                                                    # voiced amplitude [N]
    fric = np.zeros(n)                                                   # fricative amplitude [N]
    for s in syllables:
        i0 = int(s["start"] * sample_rate)
        i1 = min(n, int((s["start"] + s["dur"] * s["nucleus"]) * sample_rate))
        if i1 > i0:
            u = (np.arange(i0, i1) - i0 + 0.5) / (s["dur"] * s["nucleus"] * sample_rate)
            amp[i0:i1] = np.maximum(amp[i0:i1], s["amp"] * np.clip(np.sin(np.pi * u), 0, 1) ** s["shape"])
        if s["fricative"]:
            j1 = min(n, i0 + int(s["fric_dur"] * sample_rate))
            if j1 > i0:
                u = (np.arange(i0, j1) - i0 + 0.5) / (j1 - i0)
                fric[i0:j1] = s["fric_amp"] * np.sin(np.pi * u)

    # Pitch and formant targets at syllable centres, interpolated per sample.
    if syllables:
        centres = np.array([s["start"] + 0.5 * s["dur"] for s in syllables])
        pitch = np.interp(t, centres, [s["pitch"] for s in syllables])
        formants = np.stack([np.interp(t, centres, [_VOWELS[s["vowel"], j] for s in syllables])
                             for j in range(3)], axis=1)                 # [N, 3]
    else:
        pitch = np.ones(n)
        formants = np.tile(_VOWELS[0], (n, 1))
    f0 = f0_base * pitch * (1.0 + 0.01 * np.sin(2 * np.pi * 5.0 * t))    # [N] Hz, slight vibrato
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate

    # Harmonic source shaped by the formant resonances, normalized to unit RMS.
    n_harm = int(min(3800.0, 0.45 * sample_rate) / (0.8 * f0_base))
    harm_phase = voice_rng.uniform(0, 2 * np.pi, size=n_harm + 1)
    voice = np.zeros(n)
    power = np.zeros(n)
    for k in range(1, n_harm + 1):
        fk = k * f0
        gain = 0.08 + (_FORMANT_GAIN / (1.0 + ((fk[:, None] - formants) / _FORMANT_BW) ** 2)).sum(1)
        gain *= np.clip((4500.0 - fk) / 1000.0, 0.0, 1.0) / np.sqrt(k)
        voice += gain * np.sin(k * phase + harm_phase[k])
        power += 0.5 * gain ** 2
    voice /= np.sqrt(power + 1e-12)

    aspiration = noise_rng.standard_normal(n)
    hiss = np.diff(fric_rng.standard_normal(n + 1)) / np.sqrt(2)         # high-passed noise
    background = 0.0012 * background_rng.standard_normal(n)                    # ~ -58 dBFS
    wav = _OUTPUT_GAIN * (amp * (voice + 0.05 * aspiration) + fric * hiss) + background
    wav = np.clip(wav, -1.0, 1.0).astype(np.float32)
    env = speech_envelope(wav, sample_rate, FPS, num_video_frames(seconds))
    return SpeechClip(wav=wav, envelope=env, sample_rate=sample_rate, fps=FPS)
