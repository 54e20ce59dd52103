"""Experiment configuration: one YAML per experiment merged over ``configs/default.yaml``.

Every value can be overridden from the command line as ``key=value`` (dotted keys).
Unknown keys are errors, in the YAML file and on the command line alike.

Configs written for the reference release (``configs/avatarforcing.yaml`` with keys such as
``model_kwargs.model_init_kwargs.*``, ``denoise_steps``, ``num_frame_per_block``,
``timestep_shift``) are recognised and translated, see :func:`translate_reference_config`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from . import AvatarForcingError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

# Reference-release key -> our dotted key (values copied as they are).
_REFERENCE_KEYS = {
    "denoising_step_list": "schedule.steps",
    "denoise_steps": "schedule.steps",
    "timestep_shift": "schedule.shift",
    "num_frame_per_block": "schedule.block_frames",
    "context_noise": "cache.context_noise",
    "seed": "seed",
    "num_train_timestep": "schedule.num_train_timesteps",
    "guidance_scale": "teacher.guidance_scale",
    "negative_prompt": "teacher.negative_prompt",
    "height": "inference.height",
    "width": "inference.width",
    "fps": "inference.fps",
    "generator_ckpt": "inference.checkpoint",
    "wav2vec_path": "audio.path",
}
# Reference keys that carry no meaning for us (training infra of the peers, paths we take from CLI).
_REFERENCE_IGNORED = {
    "model_kwargs", "real_name", "fake_name", "generator_name", "i2v",
    "warp_denoising_step", "mixed_precision", "sharding_strategy", "text_encoder_fsdp_wrap_strategy",
    "generator_fsdp_wrap_strategy", "real_score_fsdp_wrap_strategy", "fake_score_fsdp_wrap_strategy",
    "wandb_host", "wandb_key", "wandb_entity", "wandb_project", "wandb_name", "logdir", "config_name",
    "data_path", "batch_size", "lr", "lr_critic", "beta1", "beta2", "beta1_critic", "beta2_critic",
    "gradient_checkpointing", "independent_first_frame", "same_step_across_blocks", "last_step_only",
    "num_training_frames", "image_or_video_shape", "distribution_loss", "trainer", "dfake_gen_update_ratio",
    "ema_weight", "ema_start_step", "max_grad_norm", "max_grad_norm_critic", "log_iters", "gc_interval",
    "num_frame_per_block_teacher", "model_name", "audio_path", "wav2vec_path", "load_raw_video",
    "no_visualize", "text_len", "local_attn_size", "sink_size",
    # Self-Forcing training keys that may ride along in released YAMLs (our trainers use their own sections)
    "ts_schedule", "ts_schedule_max", "denoising_loss_type", "total_batch_size", "num_max_frames", "min_step",
    "max_step", "real_guidance_scale", "fake_guidance_scale", "min_score_timestep", "timestep_quantile",
    "backward_simulation", "teacher_forcing", "weight_decay",
    "log_dir", "save_iters", "eval_iters", "train_iters", "max_iters", "precision", "use_ema",
}


# Our own sections may ride along in a reference-layout file (configs/avatarforcing.yaml sets the
# release-fidelity switches there); they are merged as they are, after the translated keys.
_OWN_SECTIONS = {"model", "schedule", "cache", "vae", "audio", "text", "inference"}


def _is_reference_config(cfg: DictConfig) -> bool:
    keys = set(cfg.keys())
    return bool(keys & {"model_kwargs", "denoising_step_list", "denoise_steps", "num_frame_per_block"})


def translate_reference_config(ref: DictConfig) -> DictConfig:
    """Map a reference-release YAML onto our key layout (documented in the README)."""
    out: dict[str, Any] = {}

    def put(dotted: str, value: Any) -> None:
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    for key, value in ref.items():
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
        if key in _REFERENCE_KEYS:
            put(_REFERENCE_KEYS[key], value)
        elif key == "model_kwargs":
            init = (value or {}).get("model_init_kwargs", {}) or {}
            for k, v in init.items():
                if k in {"local_attn_size", "sink_size", "use_audio", "i2v"}:
                    continue
                if k == "num_frame_per_block":
                    put("schedule.block_frames", v)
                else:
                    put(f"model.{k}", v)
            if "timestep_shift" in (value or {}):
                put("schedule.shift", value["timestep_shift"])
        elif key in _REFERENCE_IGNORED or key in _OWN_SECTIONS:
            continue
        else:
            raise AvatarForcingError(
                f"reference config key '{key}' is not known; remove it or use our key layout (see configs/default.yaml)")
    # The reference release counts steps in the 1000-step table and warps them.
    if "steps" in out.get("schedule", {}):
        out["schedule"]["warp"] = bool(ref.get("warp_denoising_step", True))
    own = {k: ref[k] for k in ref.keys() if k in _OWN_SECTIONS}
    return OmegaConf.merge(OmegaConf.create(out), OmegaConf.create(own))


def _load_yaml(path: os.PathLike | str) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise AvatarForcingError(f"config file not found: {path}; pass an existing YAML (see configs/)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise AvatarForcingError(f"config file {path} is not valid YAML ({type(exc).__name__}: {exc}); fix its syntax") from None
    if not isinstance(cfg, DictConfig):
        raise AvatarForcingError(f"config file {path} must hold a mapping at top level")
    return cfg


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise AvatarForcingError(f"override '{item}' is not of the form key=value (e.g. schedule.window_blocks=2)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("+")
    if not key:
        raise AvatarForcingError(f"override '{item}' has an empty key")
    value = OmegaConf.create({"v": raw}).v if raw == "" else OmegaConf.from_dotlist([f"v={raw}"]).v
    return key, value


def _merge_strict(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", None) or str(exc).splitlines()[0]
        raise AvatarForcingError(
            f"unknown config key '{key}' in {source}; see configs/default.yaml for the valid keys") from None


def load_config(path: os.PathLike | str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """default.yaml <- experiment YAML (optionally with ``defaults: [other.yaml]``) <- ``key=value`` overrides."""
    cfg = _load_yaml(DEFAULT_CONFIG)
    if path is not None:
        for layer, src in _experiment_layers(Path(path)):
            cfg = _merge_strict(cfg, layer, str(src))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], source: str = "the command line") -> DictConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied (unknown keys are errors)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for item in overrides:
        key, value = _parse_override(item)
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise AvatarForcingError(
                f"unknown config key '{key}' in {source}; see configs/default.yaml for the valid keys")
        OmegaConf.update(cfg, key, value, merge=True, force_add=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


_MISSING = object()


def _experiment_layers(path: Path) -> Iterable[tuple[DictConfig, Path]]:
    cfg = _load_yaml(path)
    if _is_reference_config(cfg):
        yield translate_reference_config(cfg), path
        return
    parents = cfg.pop("defaults", None) if "defaults" in cfg else None
    for parent in (parents or []):
        parent_path = (path.parent / str(parent)) if not Path(str(parent)).is_absolute() else Path(str(parent))
        yield from _experiment_layers(parent_path)
    yield cfg, path


def resolve_path(path: os.PathLike | str) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository root if it exists
    there: configs that ship with the repo name their assets relative to it (``assets/demo/model.pt``)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
