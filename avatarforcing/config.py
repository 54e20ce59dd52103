"""Experiment configuration: one YAML per experiment merged over ``configs/default.yaml``.

Every value can be overridden from the command line as ``key=value`` (dotted keys).
Unknown keys are errors, in the YAML file and on the command line alike, and so are values of the wrong
type (checked before anything loads, see :data:`_TYPES`): a key's type is that of its default in
``configs/default.yaml`` (an int is accepted for a float) or, for keys whose default is null, the table's.

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
# A non-editable install (``pip install .``) ships configs/ and assets/ inside the package, under _data/
# (see setup.py); a checkout uses its own copies first.
DATA_ROOT = Path(__file__).resolve().parent / "_data"


def resource_path(rel: os.PathLike | str, required: bool = True) -> Path:
    """A file that ships with the project (``configs/demo.yaml``, ``assets/example.wav``): the repository
    checkout's copy if there is one, else the copy installed with the package.  When neither exists, raise
    :class:`AvatarForcingError` (or, with ``required=False``, return the checkout's path anyway)."""
    for root in (REPO_ROOT, DATA_ROOT):
        if (root / rel).exists():
            return root / rel
    if not required:
        return REPO_ROOT / rel
    raise AvatarForcingError(f"{Path(rel).as_posix()} not found (looked in {REPO_ROOT} and {DATA_ROOT}); run from a full "
                             "checkout or reinstall the package with `pip install .` from one")


CONFIG_DIR = resource_path("configs", required=False)
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
    try:
        value = OmegaConf.create({"v": raw}).v if raw == "" else OmegaConf.from_dotlist([f"v={raw}"]).v
    except OmegaConfBaseException as exc:
        raise AvatarForcingError(f"override '{item}' has a value that cannot be parsed ({str(exc).splitlines()[0]}); "
                                 f"quote it, e.g. {key}='...'") from None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return key, value


# ---- value types ---------------------------------------------------------------------------------
# The type of every key is that of its value in configs/default.yaml (bool, int, float -- an int is
# accepted for a float --, str, list of ints / floats / strs), except for the keys below: those whose
# default is null or an empty list (every one of them must be listed; tests/test_config.py checks) and
# those that also accept null or a wider type than their default shows.  "type:example" ("|null": null allowed).
_TYPES = {
    "schedule.steps": "list[float]|null",          # null = evenly spaced; raw timesteps may be fractional
    "schedule.window_blocks": "int|null:2",
    "cache.context_noise": "float",
    "vae.path": "str|null:Wan2.1_VAE.pth",
    "vae.latents_mean": "list[float]|null:null",
    "vae.latents_std": "list[float]|null:null",
    "audio.path": "str|null:wav2vec2-base-960h",
    "text.path": "str|null:Wan2.1-T2V-1.3B",
    "text.tokenizer": "str|null:Wan2.1-T2V-1.3B/google/umt5-xxl",
    "text.cache_dir": "str|null",
    "inference.checkpoint": "str|null:model.pt",
    "inference.duration": "float|null:10.0",
    "data.source": "str|null:videos/",
    "data.shards": "str|null:data/shards",
    "data.ode": "str|null:data/ode",
    "data.clips_per_video": "int|null",
    "train.ema_decay": "float|null",
    "train.resume": "str|null",
    "train.stop_after": "int|null:100",
    "train.init": "str|null:model.pt",
    "train.wandb_name": "str|null:run1",
    "ode.teacher": "str|null:runs/teacher/export/model.pt",
    "ode.teacher_shift": "float|null:5.0",
    "ode.num_samples": "int|null:16000",
    "dmd.teacher": "str|null:runs/teacher/export/model.pt",
    "dmd.generator": "str|null:runs/ode/export/model.pt",
    "dmd.data": "str|null:data/ode",                 # default ${data.ode}
    "dmd.num_blocks": "int|null:5",
}
_ARTICLE = {"int": "an int", "float": "a float", "bool": "a bool", "str": "a str", "list": "a list"}


class _Type:
    def __init__(self, kind: str, elem: str | None, nullable: bool, example: Any):
        self.kind, self.elem, self.nullable, self.example = kind, elem, nullable, example

    @classmethod
    def parse(cls, spec: str, default: Any) -> "_Type":
        spec, _, example = spec.partition(":")
        nullable = spec.endswith("|null")
        kind = spec[:-5] if nullable else spec
        elem = None
        if kind.startswith("list["):
            kind, elem = "list", kind[5:-1]
        if not example:
            example = default
        else:
            example = OmegaConf.from_dotlist([f"v={example}"]).v
            example = OmegaConf.to_container(example) if isinstance(example, ListConfig) else example
        return cls(kind, elem, nullable, example)

    @classmethod
    def of_default(cls, value: Any) -> "_Type | None":
        if isinstance(value, bool):
            return cls("bool", None, False, value)
        if isinstance(value, int):
            return cls("int", None, False, value)
        if isinstance(value, float):
            return cls("float", None, False, value)
        if isinstance(value, str):
            return cls("str", None, False, value)
        if isinstance(value, list) and value:
            kinds = {cls.of_default(v).kind for v in value if cls.of_default(v) is not None}
            elem = "float" if kinds == {"int", "float"} else (kinds.pop() if len(kinds) == 1 else None)
            return cls("list", elem, False, value) if elem in {"int", "float", "str", "bool"} else None
        return None

    def expected(self) -> str:
        what = self.noun()
        if self.kind == "float":
            what = "a float or an int"
        elif self.kind == "bool":
            what = "true or false"
        return f"{what} or null" if self.nullable else what

    def noun(self) -> str:
        if self.kind == "list" and self.elem == "override":
            return "a list of key=value overrides"
        if self.kind == "list":
            return "a list of numbers" if self.elem == "float" else f"a list of {self.elem}s"
        return _ARTICLE[self.kind]

    def accepts(self, value: Any, kind: str | None = None) -> bool:
        kind = kind or self.kind
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind in ("str", "override"):
            return isinstance(value, str)
        if kind == "list":
            return isinstance(value, (list, tuple)) and all(self.accepts(v, self.elem) for v in value)
        return False


_SCHEMA: dict[str, Any] | None = None   # dotted key -> _Type (leaves) or the set of child names (sections)


def _schema() -> dict[str, Any]:
    global _SCHEMA
    if _SCHEMA is None:
        defaults = OmegaConf.to_container(_load_yaml(resource_path("configs/default.yaml")))
        schema: dict[str, Any] = {}

        def walk(node: dict, prefix: str) -> None:
            for k, v in node.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    schema[key] = set(v)
                    walk(v, key + ".")
                elif key in _TYPES:
                    schema[key] = _Type.parse(_TYPES[key], v)
                else:
                    t = _Type.of_default(v)
                    if t is None:
                        raise AvatarForcingError(f"configs/default.yaml: {key} has no type (null or empty default); "
                                                 "add it to _TYPES in avatarforcing/config.py")
                    schema[key] = t
        walk(defaults, "")
        _SCHEMA = schema
    return _SCHEMA


def _add_section(name: str, values: dict, types: dict[str, str]) -> None:
    """Extend the schema with a plugin's config section (``backends.register_config_section``): the types
    of its keys are those of ``values`` (the first config layer that sets the section), or ``types``."""
    schema = _schema()
    if name in schema:
        return

    def walk(node: dict, prefix: str) -> None:
        schema[prefix[:-1]] = set(node)
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
                continue
            rel = key.split(".", 1)[1]
            t = _Type.parse(types[rel], v) if rel in types else _Type.of_default(v)
            if t is None:
                raise AvatarForcingError(f"config section '{name}': {key} has no type (null or empty value); "
                                         "give it one in the section's register_config_section(types=...)")
            schema[key] = t
    walk(values, name + ".")


def _open_plugin_sections(cfg: DictConfig, layer: DictConfig, source: str) -> tuple[DictConfig, DictConfig]:
    """Sections a plugin registered (e.g. ``world:``, avatarforcing/world/) enter the config with the first
    layer that sets them: that layer defines their keys; later layers and overrides are strict as usual."""
    new = [k for k in layer.keys() if k not in cfg]
    if not new:
        return cfg, layer
    from .backends import config_section_types
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    rest = OmegaConf.create(OmegaConf.to_container(layer, resolve=False))
    for name in new:
        types = config_section_types(str(name), source)
        values = OmegaConf.to_container(layer[name], resolve=False)
        if not isinstance(values, dict):
            raise AvatarForcingError(f"config file {source}: section '{name}' must be a mapping of its keys")
        _add_section(str(name), values, types)
        cfg[name] = _check_value(str(name), values, None, f"config file {source}: ", ": ")
        del rest[name]
    return cfg, rest


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_value(key: str, value: Any, raw: str | None, where: str, sep: str) -> Any:
    """``value`` for ``key`` if its type fits (numbers given for a str key become that str), else a one-line error.

    ``raw``: the override's text (None for YAML values); ``where``: prefix naming the source; ``sep``: '=' or ': '.
    Unknown keys pass (the strict merge reports them with the valid-keys hint)."""
    schema = _schema()
    spec = schema.get(key)
    shown = raw if raw is not None else _fmt(value)
    if spec is None or _is_interpolation(value):
        return value
    if isinstance(spec, set):        # a section: only a mapping of its keys fits
        if not isinstance(value, dict):
            first = sorted(spec)[0]
            raise AvatarForcingError(f"{where}{key}{sep}{shown} sets a whole section; set its keys instead, "
                                     f"e.g. {key}.{first}{sep}{_fmt(schema.get(f'{key}.{first}').example) if isinstance(schema.get(f'{key}.{first}'), _Type) else '...'}")
        return {k: _check_value(f"{key}.{k}", v, None if raw is None else _fmt(v), where, sep) for k, v in value.items()}
    if value is None and spec.nullable:
        return value
    if spec.kind == "str" and raw is not None and isinstance(value, (bool, int, float)):
        return raw.strip()             # inference.prompt=123, train.mixed_precision=no: the text as typed
    if spec.kind == "str" and raw is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if spec.accepts(value):
        if spec.kind == "list" and spec.elem == "override":
            for item in value:           # override lists (e.g. a pipeline's per-stage ones): checked now, not later
                k, v = _parse_override(item)
                _check_key_known(k, f"{key}")
                _check_value(k, v, item.split("=", 1)[1], f"{where}{key}: ", "=")
        return value
    noun = spec.noun()
    hint = " (quote words such as no/yes/on/off)" if spec.kind == "str" and isinstance(value, bool) else ""
    raise AvatarForcingError(f"{where}{key}{sep}{shown} is not {noun} (expected {spec.expected()}){hint}; "
                             f"e.g. {key}{sep}{_fmt(spec.example)}")


def _check_key_known(key: str, source: str) -> None:
    if key not in _schema():
        raise AvatarForcingError(
            f"unknown config key '{key}' in {source}; see configs/default.yaml for the valid keys")


def _check_layer(layer: DictConfig, source: str) -> DictConfig:
    """The experiment layer with every known value type-checked (see :func:`_check_value`)."""
    data = OmegaConf.to_container(layer, resolve=False)
    checked = {k: _check_value(k, v, None, f"config file {source}: ", ": ") for k, v in data.items()}
    return OmegaConf.create(checked)


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
    cfg = _load_yaml(resource_path("configs/default.yaml"))
    if path is not None:
        for layer, src in _experiment_layers(resolve_path(path)):
            cfg, layer = _open_plugin_sections(cfg, layer, str(src))
            cfg = _merge_strict(cfg, _check_layer(layer, str(src)), str(src))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], source: str = "the command line") -> DictConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied (unknown keys are errors)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for item in overrides:
        key, value = _parse_override(item)
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            from .backends import ENTRY_POINTS
            section = key.split(".", 1)[0]
            hint = (f"; {section}.* keys exist only with a {section} config, e.g. --config configs/{section}/pipeline.yaml"
                    if section in ENTRY_POINTS and section not in cfg else "")
            raise AvatarForcingError(
                f"unknown config key '{key}' in {source}; see configs/default.yaml for the valid keys{hint}")
        value = _check_value(key, value, item.split("=", 1)[1], "", "=")
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
    """A path as given if it exists (or is absolute), else a shipped file of that relative name if there is one
    (:func:`resource_path`: the checkout's, else the installed package's): configs that ship with the project
    name their assets relative to the repository root (``assets/demo/model.pt``)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    for root in (REPO_ROOT, DATA_ROOT):
        if (root / p).exists():
            return root / p
    return p


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
