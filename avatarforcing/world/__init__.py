"""The synthetic world: procedurally rendered talking faces driven by synthetic speech.

Real weights and data cannot be downloaded here, so the whole method is trained and evaluated on
this world, whose ground truth (mouth opening, head pose, blinks, identity) is known exactly.

Importing this package registers its backends (:mod:`avatarforcing.backends`) like any other plugin: the codec
as ``vae.kind: world``, the metric backends ``world`` and ``world_v2`` (v1 / v2 renderer frames and the speech
envelope for the metric nets) and the config section ``world:`` (set by configs/world/base.yaml).
The core never imports it statically; the backend registry imports it on the first lookup of kind ``world``.
"""
from .. import backends as _backends
from .dataset import Clip, clip_seed, generate_clip, load_ground_truth, sample_reference, write_world
from .render import Identity, Motion, measure_mouth_open, render, sample_identity, sample_motion
from .metric_nets import METRIC_BACKEND, METRIC_BACKEND_V2
from .speech import FPS, SAMPLE_RATE, SpeechClip, speech_envelope, synth_speech

__all__ = [
    "Clip", "clip_seed", "generate_clip", "load_ground_truth", "sample_reference", "write_world",
    "Identity", "Motion", "measure_mouth_open", "render", "sample_identity", "sample_motion",
    "FPS", "SAMPLE_RATE", "SpeechClip", "speech_envelope", "synth_speech",
]


def _build_codec(cfg_vae):
    """vae.kind: world -> :func:`avatarforcing.world.codec.build_codec` (imported when first used)."""
    from .codec import build_codec
    return build_codec(cfg_vae)


_backends.register_vae("world", _build_codec)
_backends.register_metric_backend("world", METRIC_BACKEND)
_backends.register_metric_backend("world_v2", METRIC_BACKEND_V2)
# the `world:` config section (its keys and defaults: configs/world/base.yaml)
_backends.register_config_section("world", {**{f"{stage}_overrides": "list[override]:[train.steps=2]"
                                               for stage in ("teacher", "backfill", "ode", "dmd")},
                                            "grid": "list[str]:[2x2,1x4]"})
