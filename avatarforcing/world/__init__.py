"""The synthetic world: procedurally rendered talking faces driven by synthetic speech.

Real weights and data cannot be downloaded here, so the whole method is trained and evaluated on
this world, whose ground truth (mouth opening, head pose, blinks, identity) is known exactly.
"""
from .dataset import Clip, clip_seed, generate_clip, load_ground_truth, sample_reference, write_world
from .render import Identity, Motion, measure_mouth_open, render, sample_identity, sample_motion
from .speech import FPS, SAMPLE_RATE, SpeechClip, speech_envelope, synth_speech

__all__ = [
    "Clip", "clip_seed", "generate_clip", "load_ground_truth", "sample_reference", "write_world",
    "Identity", "Motion", "measure_mouth_open", "render", "sample_identity", "sample_motion",
    "FPS", "SAMPLE_RATE", "SpeechClip", "speech_envelope", "synth_speech",
]
