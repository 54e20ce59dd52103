"""World v2 speech: sentences spoken by espeak-ng, with its phoneme timings driving viseme mouth shapes.

A seed picks a voice (espeak-ng voice + variant, pitch, rate) and an endless stream of sentences (words of a
fixed list); sentence k depends only on (seed, k), the pause after it too.  The clip speaks sentences until it
is ``seconds`` long (one second past it, so the last frames' co-articulation sees what follows), resamples
espeak's 22,050 Hz to 16 kHz and cuts.  espeak-ng reports where each phoneme starts in its own audio (the
``espeakEVENT_PHONEME`` events of libespeak-ng, read through ctypes in :mod:`._espeak_worker`); those times
are exact for the audio they belong to, and each phoneme maps to one of :data:`VISEMES`.

Per video frame t (the span [t/fps, (t+1)/fps)):
  ``visemes[t]``      the viseme with the largest dominance-weighted share of the span (a bilabial closure of
                      ~50 ms wins its frame: closures are what lip reading notices first);
  ``mouth[t]``        the mouth-shape parameters (:data:`SHAPE_KEYS`) blended over the neighbouring frames with
                      a [1, 3, 1] / 5 co-articulation kernel, weighted by dominance (Cohen & Massaro's model);
  ``mouth_open[t]``   ``mouth[t, 0]``, the opening in [0, 1] (what the v1 renderer calls ``mouth_open``);
  ``envelope[t]``     :func:`.speech.speech_envelope` of the wav, as in v1.

Deterministic per seed, and prefix-consistent (a shorter clip of the same seed is the start of a longer one; the
last frame's mouth excepted), because each clip is spoken in a fresh process (see :mod:`._espeak_worker`).
Needs the Debian package ``espeak-ng`` (``apt-get install -y espeak-ng``); without it, a one-line error.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import AvatarForcingError
from .speech import FPS, SAMPLE_RATE, num_video_frames, speech_envelope

VISEMES = ("rest", "closed", "open", "wide", "round", "fv")
REST, CLOSED, OPEN, WIDE, ROUND, FV = range(len(VISEMES))
SHAPE_KEYS = ("open", "width", "round", "teeth_upper", "teeth_lower")
# Mouth shape of each viseme: opening (0-1), width (x mouth_w), lip rounding/protrusion (0-1), upper and lower
# teeth shown (0-1).  FV: lower lip tucked under the upper teeth.
VISEME_SHAPES = np.array([
    [0.04, 1.00, 0.0, 0.0, 0.0],     # rest: relaxed, lips just parted
    [0.00, 0.92, 0.0, 0.0, 0.0],     # closed (m b p): lips pressed
    [1.00, 1.00, 0.1, 1.0, 0.0],     # open (a, aI, aU, V, @ ...)
    [0.32, 1.28, 0.0, 1.0, 1.0],     # wide (i:, I, e, s, t, d, n, ...)
    [0.45, 0.58, 1.0, 0.0, 0.0],     # round (u:, oU, w, r, S ...)
    [0.14, 1.02, 0.0, 1.0, 0.0],     # fv (f v)
], dtype=np.float32)
_DOMINANCE = np.array([0.5, 4.0, 1.0, 1.0, 1.5, 2.5], dtype=np.float32)
_COARTICULATION = np.array([1.0, 3.0, 1.0], dtype=np.float32) / 5.0

# espeak-ng phoneme mnemonics (English voices) -> viseme; anything else (pauses "_", "_:", ...) is rest.
_PHONEME_VISEME = {
    **dict.fromkeys(("m", "b", "p"), CLOSED),
    **dict.fromkeys(("f", "v"), FV),
    **dict.fromkeys(("w", "W", "r", "r-", "S", "Z", "tS", "dZ", "u:", "U", "u", "oU", "o@", "O:", "O", "OI", "O@",
                     "U@", "O2", "0", "w#", "Or"), ROUND),
    **dict.fromkeys(("i:", "i", "I", "I2", "I#", "e", "eI", "E", "E2", "j", "s", "z", "T", "D", "t", "d", "n", "l",
                     "k", "g", "N", "h", "t#", "d#", "n-", "l/", "L", "x", "?", "i@", "i@3", "IR"), WIDE),
    **dict.fromkeys(("a", "a#", "A:", "A", "A@", "aI", "aI@", "aI3", "V", "@", "@2", "@5", "@L", "3:", "3", "e@",
                     "a2", "aa", "@-", "aU"), OPEN),
}

WORDS = tuple("""
a about above after again all always and another apple are around baby back bad ball be beach bear beautiful
because bed before best big bird black blue boat book both box boy bread bring brown bubble but buy by call came
can cat change city cold come could cup day did do dog door down each easy even every face far fast feel few
find fine first fish five food for four friend from full funny give go good green group happy have he help her
here high home hope house how if in into is it just keep kind know laugh leave let light like little live long
look love make many may me meet might mile milk mind money moon more morning most mother move much music must my
name near never new next nice night no not now number of off often old on once one only open or other our out
over paper park people photo piano pick place play please pool put quick quite rain read red room round run
said same say school see seven she shoe should show simple sleep slow small so some soon soup speak spoon start
stay still stop summer sun sweet table take talk tell ten than that the their them then there these they thing
think this three through time to today too tree true two under up upon use very view voice wait walk want warm
water way we well went were what when where which while white who why will window winter with woman wood word
work would write year yellow yes you your zoo
""".split())

_VOICES = ("en-us", "en-us+f2", "en-us+m3", "en", "en+f4", "en-us+m1", "en-us+f5", "en-gb-x-rp")
_WORKER = Path(__file__).with_name("_espeak_worker.py")
_ESPEAK_RATE = 22050


@dataclass
class Phoneme:
    start: float             # seconds in the clip
    end: float
    name: str                # espeak-ng mnemonic
    viseme: int              # index into VISEMES


@dataclass
class TTSClip:
    wav: np.ndarray          # float32 [N] in [-1, 1], 16 kHz
    envelope: np.ndarray     # float32 [T], speech_envelope(wav)
    visemes: np.ndarray      # int64 [T], index into VISEMES
    mouth: np.ndarray        # float32 [T, len(SHAPE_KEYS)] co-articulated mouth shape
    phonemes: list = field(default_factory=list)     # [Phoneme], in clip time
    sentences: list = field(default_factory=list)    # [str], those that start inside the clip
    voice: dict = field(default_factory=dict)        # espeak-ng voice, rate, pitch
    sample_rate: int = SAMPLE_RATE
    fps: int = FPS

    @property
    def mouth_open(self) -> np.ndarray:
        return self.mouth[:, 0]

    @property
    def seconds(self) -> float:
        return len(self.wav) / self.sample_rate


def phoneme_viseme(name: str) -> int:
    """espeak-ng phoneme mnemonic (stress marks and lengthening stripped) -> viseme index."""
    return _PHONEME_VISEME.get(name, _PHONEME_VISEME.get(name.strip("'\",%=:;"), REST))


def sentence(seed: int, k: int) -> str:
    """Sentence ``k`` of the stream of ``seed``: 3-9 words of :data:`WORDS`."""
    rng = np.random.default_rng([seed, 707, k])
    words = [WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(3, 10)))]
    return " ".join(words).capitalize() + "."


def voice(seed: int) -> dict:
    """The espeak-ng voice of ``seed``: voice name (+ variant), rate (words per minute) and pitch (0-99)."""
    rng = np.random.default_rng([seed, 708])
    return dict(voice=str(rng.choice(_VOICES)), rate=int(rng.integers(140, 181)), pitch=int(rng.integers(30, 71)))


def espeak_available() -> bool:
    """Whether libespeak-ng can be loaded (the Debian package espeak-ng)."""
    import ctypes
    try:
        ctypes.CDLL("libespeak-ng.so.1")
    except OSError:
        return False
    return True


def _speak(sentences: list[str], v: dict) -> list[tuple[np.ndarray, list]]:
    """Speak ``sentences`` in a fresh espeak-ng process -> [(int16 audio at 22,050 Hz, [[sample, phoneme]])]."""
    req = json.dumps(dict(v, sentences=sentences))
    try:
        res = subprocess.run([sys.executable, str(_WORKER)], input=req.encode(), capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise AvatarForcingError(f"espeak-ng took over 600 s for {len(sentences)} sentences; speak fewer") from None
    if res.returncode != 0:
        msg = res.stderr.decode(errors="replace").strip().splitlines()
        raise AvatarForcingError(f"espeak-ng failed: {msg[-1] if msg else res.returncode}; "
                                 "install it with: apt-get install -y espeak-ng")
    head, _, pcm = res.stdout.partition(b"\n")
    meta = json.loads(head)
    if meta["sample_rate"] != _ESPEAK_RATE:
        raise AvatarForcingError(f"espeak-ng speaks at {meta['sample_rate']} Hz, expected {_ESPEAK_RATE}; "
                                 "use the Debian espeak-ng 1.51 package")
    audio = np.frombuffer(pcm, dtype="<i2")
    out, i = [], 0
    for s in meta["sentences"]:
        out.append((audio[i:i + s["samples"]], s["phonemes"]))
        i += s["samples"]
    return out


def _frame_shares(phonemes: list[Phoneme], T: int, fps: int) -> np.ndarray:
    """Seconds of each viseme inside each frame's span -> float32 [T, len(VISEMES)] (silence counts as rest)."""
    share = np.zeros((T, len(VISEMES)), np.float64)
    share[:, REST] = 1.0 / fps
    for p in phonemes:
        f0, f1 = int(math.floor(p.start * fps)), min(T - 1, int(math.floor(p.end * fps)))
        for t in range(max(f0, 0), f1 + 1):
            overlap = min(p.end, (t + 1) / fps) - max(p.start, t / fps)
            if overlap > 0:
                share[t, p.viseme] += overlap
                share[t, REST] -= overlap
    share[:, REST] = np.maximum(share[:, REST], 0.0)
    return share.astype(np.float32)


def viseme_track(phonemes: list[Phoneme], T: int, fps: int = FPS) -> tuple[np.ndarray, np.ndarray]:
    """Phonemes in clip time -> (visemes int64 [T], co-articulated mouth shapes float32 [T, len(SHAPE_KEYS)])."""
    share = _frame_shares(phonemes, T, fps) * _DOMINANCE                  # [T, V]
    labels = share.argmax(1).astype(np.int64)
    padded = np.pad(share, ((1, 1), (0, 0)), mode="edge")
    smooth = sum(k * padded[i:i + T] for i, k in enumerate(_COARTICULATION))
    weights = smooth / smooth.sum(1, keepdims=True)
    return labels, (weights @ VISEME_SHAPES).astype(np.float32)


def synth_tts(seconds: float, seed: int, fps: int = FPS) -> TTSClip:
    """A clip of espeak-ng speech ``seconds`` long with its visemes, deterministic from ``seed``."""
    from scipy.signal import resample_poly

    if not seconds or seconds <= 0:
        raise AvatarForcingError(f"synth_tts needs seconds > 0, got {seconds}; pass a positive duration")
    v = voice(seed)
    need = seconds + 1.0
    lead = float(np.random.default_rng([seed, 709]).uniform(0.25, 0.45))   # silence first: frame 0 at rest
    count = int(need / 2.0) + 2
    while True:                                       # speak more sentences until the clip is long enough
        spoken = _speak([sentence(seed, k) for k in range(count)], v)
        pieces, phonemes, texts = [np.zeros(int(round(lead * SAMPLE_RATE)), np.float32)], [], []
        t = lead
        for k, (pcm, events) in enumerate(spoken):
            if t < seconds:
                texts.append(sentence(seed, k))
            wav = resample_poly(pcm.astype(np.float64) / 32768.0, SAMPLE_RATE // 50, _ESPEAK_RATE // 50)
            starts = [t + s / _ESPEAK_RATE for s, _ in events] + [t + len(pcm) / _ESPEAK_RATE]
            phonemes += [Phoneme(starts[i], starts[i + 1], name, phoneme_viseme(name))
                         for i, (_, name) in enumerate(events) if starts[i + 1] > starts[i]]
            pause = float(np.random.default_rng([seed, 710, k]).uniform(0.25, 0.9))
            pieces += [wav.astype(np.float32), np.zeros(int(round(pause * SAMPLE_RATE)), np.float32)]
            t += len(wav) / SAMPLE_RATE + pause
        if t >= need:
            break
        count *= 2
    n, T = int(round(seconds * SAMPLE_RATE)), num_video_frames(seconds, fps)
    wav = np.clip(np.concatenate(pieces)[:n], -1.0, 1.0).astype(np.float32)
    phonemes = [p for p in phonemes if p.start < seconds]
    visemes, mouth = viseme_track(phonemes, T + 1, fps)                   # one frame more: co-articulation
    return TTSClip(wav=wav, envelope=speech_envelope(wav, SAMPLE_RATE, fps, T), visemes=visemes[:T],
                   mouth=mouth[:T], phonemes=phonemes, sentences=texts, voice=v, fps=fps)
