"""Backend registry: latent codecs (``vae.kind``) and metric backends, looked up by kind.

A backend registers itself when its module is imported::

    from avatarforcing.backends import register_vae
    register_vae("mycodec", lambda cfg_vae: MyCodec.load(cfg_vae["path"]))   # factory(vae config) -> codec

and is then selected by ``vae.kind: mycodec``.  The core's own codec (``wan``) registers in
:mod:`avatarforcing.vae`; the synthetic world (:mod:`avatarforcing.world`) registers its codec (kind ``world``)
and its metric backend (``world``: renderer frames to train the metric nets, the speech loudness envelope).

Built-in plugins are imported on first lookup through :data:`ENTRY_POINTS` (kind -> module), so configs
with ``vae.kind: world`` work without importing the world by hand.  This table is the only place the core
names a backend package (tests/test_layering.py enforces it).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from . import AvatarForcingError

# kind -> module that registers it when imported (the plugin table; the core imports nothing else of a backend)
ENTRY_POINTS: dict[str, str] = {"world": "avatarforcing.world", "world_v2": "avatarforcing.world"}

VaeFactory = Callable[[Any], Any]           # vae config section -> codec (encode / decode, WanVAE's interface)


@dataclass(frozen=True)
class MetricBackend:
    """What the metric nets need from a world of videos (see :mod:`avatarforcing.metrics`).

    training_frames(num_ids, per_id, size, seed) -> (uint8 frames [N, S, S, 3], mouth opening [N], identity label [N]):
        labelled frames to train the sync expert and the identity net on.
    envelope(wav, sample_rate, fps, num_frames) -> float [T]: the audio's per-frame loudness that the mouth
        opening is correlated with (lip sync)."""

    training_frames: Callable[..., tuple]
    envelope: Callable[..., Any]


_VAE: dict[str, VaeFactory] = {}
_METRICS: dict[str, MetricBackend] = {}
_SECTIONS: dict[str, dict[str, str]] = {}


def register_vae(kind: str, factory: VaeFactory) -> None:
    """Make ``vae.kind: <kind>`` build its codec with ``factory(cfg_vae)`` (re-registering replaces)."""
    _VAE[str(kind)] = factory


def register_metric_backend(kind: str, backend: MetricBackend) -> None:
    """Make ``MetricNets.train(backend=kind)`` / lip sync of nets trained on it use ``backend``."""
    if not isinstance(backend, MetricBackend):
        raise AvatarForcingError(f"register_metric_backend needs a MetricBackend, got {type(backend).__name__}")
    _METRICS[str(kind)] = backend


def register_config_section(name: str, types: dict[str, str] | None = None) -> None:
    """Allow a top-level config section ``name:`` that only the plugin's own configs set (e.g. ``world:`` in
    configs/world/): its keys are those of the first config layer that sets it.  ``types`` gives the type of
    keys whose value there is null or an empty list, as in avatarforcing/config.py (e.g. ``"int|null:2"``,
    ``"list[override]:[train.steps=2]"`` for lists of key=value overrides)."""
    _SECTIONS[str(name)] = dict(types or {})


def config_section_types(name: str, source: str = "the config") -> dict[str, str]:
    """The registered section ``name`` (plugins are imported on demand); an unknown section is a one-line error."""
    if name not in _SECTIONS and name in ENTRY_POINTS:
        importlib.import_module(ENTRY_POINTS[name])
    if name not in _SECTIONS:
        raise AvatarForcingError(f"unknown config key '{name}' in {source}; see configs/default.yaml for the valid "
                                 f"keys (plugin sections: {', '.join(sorted(_SECTIONS | dict.fromkeys(ENTRY_POINTS))) or 'none'})")
    return _SECTIONS[name]


def _lookup(table: dict, kind: str, what: str, key: str):
    kind = str(kind)
    if kind not in table and kind in ENTRY_POINTS:
        importlib.import_module(ENTRY_POINTS[kind])            # the plugin registers itself on import
    if kind in table:
        return table[kind]
    known = sorted(set(table) | set(ENTRY_POINTS))
    hint = (f"kind '{kind}' is provided by {ENTRY_POINTS[kind]}, which did not register it: import it or use "
            f"another kind" if kind in ENTRY_POINTS else
            f"import the module that registers it (avatarforcing.backends.register_{key}) or use one of these")
    raise AvatarForcingError(f"unknown {what} '{kind}'; known kinds: {', '.join(known) or 'none'}; {hint}")


def vae_factory(kind: str) -> VaeFactory:
    """The registered codec factory of ``vae.kind`` (built-in plugins are imported on demand)."""
    return _lookup(_VAE, kind, "vae.kind", "vae")


def metric_backend(kind: str) -> MetricBackend:
    """The registered metric backend ``kind`` (built-in plugins are imported on demand)."""
    return _lookup(_METRICS, kind, "metric backend", "metric_backend")


def vae_kinds() -> list[str]:
    """Registered and built-in (not yet imported) codec kinds."""
    return sorted(set(_VAE) | set(ENTRY_POINTS))
