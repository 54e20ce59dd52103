"""DiT checkpoints: the released AvatarForcing student and the base Wan2.1 DiT, in every layout we accept.

Every loader returns a flat state dict in *our* naming (Wan2.1's original names plus ``audio_proj.*`` and
``audio_cond_projs.*``, see avatarforcing/model.py), ready for ``WanDiT.load_state_dict``:

* released student (``model.pt``, ``ode_audio_init.pt``): ``torch.load`` -> ``{'generator': ..., 'generator_ema': ...}``,
  keys ``model.`` + Wan names, FSDP / torch.compile wrappers in the names, unmerged PEFT LoRA
  (``X.base_layer.weight``, ``X.lora_A.default.weight`` [r, in], ``X.lora_B.default.weight`` [out, r]) that is
  merged here as W = W0 + (alpha / r) B A  (docs/spec.md section 5),
* base Wan2.1-T2V-1.3B ``diffusion_pytorch_model.safetensors`` (original names, maybe sharded with an index json,
  in_dim 16, no audio modules),
* the diffusers layout (``Wan2.1-T2V-1.3B-Diffusers`` or its ``transformer/`` folder), renamed by the table
  below (docs/spec.md section 8).

``load_dit`` picks the reader, converts, widens a base model's patch embedding to our in_dim (new channels
zero, so the model starts by ignoring the reference/mask channels), leaves the audio modules of a base model
as the model initialised them ("newly initialized"), checks shapes and keys, and loads.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import AvatarForcingError

log = logging.getLogger(__name__)

AUDIO_PREFIXES = ("audio_proj.", "audio_cond_projs.")
DEFAULT_LORA_ALPHA = 64.0          # the release: rank 128, alpha 64 -> scale 0.5

# Wrapper names torch puts into parameter names (FSDP, torch.compile), removed wherever they occur, and
# leading prefixes of wrappers (the release's WanDiffusionWrapper 'model.', DDP 'module.', a PeftModel).
_STRIP_ANYWHERE = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_STRIP_LEADING = ("model.", "module.", "base_model.model.")

# diffusers WanTransformer3DModel -> original Wan2.1 names (docs/spec.md section 8). diffusers fuses nothing for Wan.
_DIFFUSERS_TO_WAN = [(re.compile(p), r) for p, r in [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),          # the affine cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]]

_LORA_A = re.compile(r"^(?P<mod>.+)\.lora_A(?:\.(?P<name>[^.]+))?\.weight$")


@dataclass
class LoadReport:
    """What ``load_dit`` did; ``str(report)`` is a one-line summary."""

    path: str
    container: str                  # 'released' | 'state_dict' | 'safetensors'
    naming: str                     # 'wan' | 'diffusers'
    loaded: int                     # tensors copied into the model
    use_ema: bool = False
    lora_merged: int = 0            # linears with a merged LoRA
    expanded: list[str] = field(default_factory=list)
    newly_initialized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # only with strict=False
    unexpected: list[str] = field(default_factory=list)   # only with strict=False

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.path} ({self.container}, {self.naming} names"
                 + (", EMA" if self.use_ema else "") + ")"]
        if self.lora_merged:
            parts.append(f"merged LoRA into {self.lora_merged} linears")
        parts += self.expanded
        if self.newly_initialized:
            parts.append(f"{len(self.newly_initialized)} newly initialized ({_preview(self.newly_initialized)})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_preview(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_preview(self.unexpected)})")
        return "; ".join(parts)


# ---- reading files ----------------------------------------------------------------------------------

def _preview(keys, n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(exc).__name__}: {first[:160]}"


def _unreadable(path, exc: BaseException) -> AvatarForcingError:
    return AvatarForcingError(f"{path} is not a readable checkpoint (truncated download?): {_first_line(exc)}; "
                              f"download or export it again")


def _require(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise AvatarForcingError(f"checkpoint not found: {path}; pass an existing file or folder "
                                 f"(released model.pt, Wan2.1 folder, or diffusers transformer/ folder)")
    return path


def _magic(path: Path) -> str:
    """'safetensors' | 'zip' (torch.save) | 'pickle' (legacy torch.save) | 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        return "safetensors"
    return "pickle" if head[:1] == b"\x80" else "unknown"


def _torch_load(path: Path, allow_pickle: bool = False):
    """torch.load on CPU, tensors only unless ``allow_pickle`` (which runs the file's pickled code)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError as exc:   # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() and _magic(path) in ("zip", "pickle"):
            raise AvatarForcingError(
                f"{path} holds pickled Python objects besides tensors; if you trust its source, load it with "
                f"allow_pickle=True (--allow-pickle)") from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # zip reader errors, EOF, ...
        raise _unreadable(path, exc) from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except Exception as exc:
        raise _unreadable(index, exc) from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise AvatarForcingError(f"shard {shard} listed in {index} is missing; download all shards into {index.parent}")
        state.update(_safetensors_load(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise AvatarForcingError(f"{index} lists {len(missing)} tensors that its shards lack ({_preview(missing)}); "
                                 f"download the shards again")
    return state


def _find_in_folder(folder: Path) -> Path:
    """The DiT weights of a folder: an index json, a single safetensors file, or the released model.pt."""
    for d in (folder, folder / "transformer"):
        if not d.is_dir():
            continue
        indexes = sorted(d.glob("diffusion_pytorch_model*.safetensors.index.json")) or sorted(d.glob("*.safetensors.index.json"))
        if indexes:
            return indexes[0]
        files = sorted(d.glob("diffusion_pytorch_model*.safetensors"))
        if len(files) == 1:
            return files[0]
        if not files and len(list(d.glob("*.safetensors"))) == 1:
            return next(d.glob("*.safetensors"))
        for name in ("diffusion_pytorch_model.bin", "model.pt"):
            if (d / name).is_file():
                return d / name
    raise AvatarForcingError(
        f"{folder} holds no DiT weights (diffusion_pytorch_model.safetensors, a *.safetensors.index.json, "
        f"transformer/ or model.pt); pass the Wan2.1-T2V-1.3B folder, the diffusers folder or a checkpoint file")


def _select_generator(obj, path: Path, use_ema: bool) -> tuple[dict, str]:
    """The generator's state dict from a torch.load result; a bare state dict is accepted too."""
    if not isinstance(obj, dict):
        raise AvatarForcingError(f"{path} holds a {type(obj).__name__}, not a state dict; "
                                 f"pass a released checkpoint or a saved state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if use_ema:
            raise AvatarForcingError(f"{path} is a bare state dict without 'generator_ema'; load it without use_ema (drop --ema)")
        return obj, "state_dict"
    want = "generator_ema" if use_ema else "generator"
    if isinstance(obj.get(want), dict):
        return obj[want], "released"
    if not use_ema:
        for alt in ("state_dict", "model", "module"):
            if isinstance(obj.get(alt), dict):
                return obj[alt], "state_dict"
    held = _preview(sorted(map(str, obj)), 6)
    fix = ("load it without use_ema (drop --ema)" if use_ema and "generator" in obj
           else "load it with use_ema=True (--ema)" if "generator_ema" in obj
           else "pass a released AvatarForcing checkpoint (model.pt) or a state dict")
    raise AvatarForcingError(f"{path} has no '{want}' entry (it holds: {held}); {fix}")


def read_state_dict(path, *, use_ema: bool = False, allow_pickle: bool = False) -> tuple[dict, str]:
    """Raw tensors of a checkpoint file or folder in the source's naming, and the container kind."""
    path = _require(path)
    if path.is_dir():
        path = _find_in_folder(path)
    if path.name.endswith(".index.json"):
        return _load_sharded(path), "safetensors"
    if path.suffix == ".safetensors" or _magic(path) == "safetensors":
        if use_ema:
            raise AvatarForcingError(f"{path} is a safetensors state dict without an EMA copy; load it without use_ema (drop --ema)")
        return _safetensors_load(path), "safetensors"
    return _select_generator(_torch_load(path, allow_pickle), path, use_ema)


# ---- converting names -------------------------------------------------------------------------------

def strip_wrappers(state: dict) -> dict:
    """Remove FSDP / torch.compile / wrapper prefixes from every key."""
    out = {}
    for key, value in state.items():
        for s in _STRIP_ANYWHERE:
            key = key.replace(s, "")
        changed = True
        while changed:
            changed = False
            for p in _STRIP_LEADING:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        if key in out:
            raise AvatarForcingError(f"checkpoint key {key} occurs twice after removing wrapper prefixes")
        out[key] = value
    return out


def is_diffusers_layout(state: dict) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k or k.startswith("proj_out.") for k in state)


def diffusers_to_wan(state: dict) -> dict:
    """Rename diffusers WanTransformer3DModel keys to the original Wan2.1 names (others unchanged)."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _DIFFUSERS_TO_WAN:
            new, n = pattern.subn(repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def merge_lora(state: dict, *, lora_alpha: float = DEFAULT_LORA_ALPHA, lora_rank: int | None = None,
               lora_scale: float | None = None) -> tuple[dict, int]:
    """Merge unmerged PEFT LoRA into the base weights: W = W0 + scale * B @ A, scale = alpha / rank.

    The rank is lora_A's first dimension unless ``lora_rank`` is given; ``lora_scale`` overrides alpha / rank.
    The merge runs in float32 and is cast back to the base weight's dtype.  Returns (state, merged count).
    """
    out = dict(state)
    merged = 0
    for key in [k for k in state if _LORA_A.match(k)]:
        mod, name = _LORA_A.match(key).group("mod", "name")
        tag = f".{name}" if name else ""
        b_key = f"{mod}.lora_B{tag}.weight"
        if b_key not in out:
            raise AvatarForcingError(f"LoRA tensor {key} has no matching {b_key}; the checkpoint is incomplete")
        w_key = next((k for k in (f"{mod}.base_layer.weight", f"{mod}.weight") if k in out), None)
        if w_key is None:
            raise AvatarForcingError(f"LoRA tensor {key} has no base weight {mod}.base_layer.weight; the checkpoint is incomplete")
        a, b, w0 = out.pop(key), out.pop(b_key), out[w_key]
        if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w0.shape):
            raise AvatarForcingError(f"LoRA of {mod}: A {list(a.shape)}, B {list(b.shape)} do not fit the base weight "
                                     f"{list(w0.shape)}; the checkpoint is inconsistent")
        scale = lora_scale if lora_scale is not None else lora_alpha / (lora_rank or a.shape[0])
        out[w_key] = (w0.float() + scale * (b.float() @ a.float())).to(w0.dtype)
        b_bias = out.pop(f"{mod}.lora_B{tag}.bias", None)      # PEFT lora_bias=True
        if b_bias is not None:
            bias_key = next(k for k in (f"{mod}.base_layer.bias", f"{mod}.bias") if k in out)
            out[bias_key] = (out[bias_key].float() + scale * b_bias.float()).to(out[bias_key].dtype)
        merged += 1
    return {k.replace(".base_layer.", "."): v for k, v in out.items()}, merged


def convert_state_dict(state: dict, *, lora_alpha: float = DEFAULT_LORA_ALPHA, lora_rank: int | None = None,
                       lora_scale: float | None = None) -> tuple[dict, dict]:
    """Any accepted naming -> ours: strip wrappers, rename diffusers keys, merge LoRA.  Returns (state, info)."""
    state = strip_wrappers(state)
    naming = "diffusers" if is_diffusers_layout(state) else "wan"
    if naming == "diffusers":
        state = diffusers_to_wan(state)
    state, merged = merge_lora(state, lora_alpha=lora_alpha, lora_rank=lora_rank, lora_scale=lora_scale)
    return state, {"naming": naming, "lora_merged": merged}


def expand_patch_embedding(state: dict, in_dim: int) -> tuple[dict, list[str]]:
    """Widen patch_embedding.weight to ``in_dim`` input channels: copy the existing ones, zero the new ones."""
    w = state.get("patch_embedding.weight")
    if w is None or w.shape[1] >= in_dim:
        return state, []
    new = torch.zeros((w.shape[0], in_dim, *w.shape[2:]), dtype=w.dtype)
    new[:, : w.shape[1]] = w
    state = {**state, "patch_embedding.weight": new}
    return state, [f"patch_embedding in_dim {w.shape[1]} -> {in_dim} (new channels zero)"]


def has_audio(state: dict) -> bool:
    return any(k.startswith(AUDIO_PREFIXES) for k in state)


# ---- public loaders ---------------------------------------------------------------------------------

def load_student_state(path, use_ema: bool = False, *, lora_alpha: float = DEFAULT_LORA_ALPHA,
                       lora_rank: int | None = None, lora_scale: float | None = None,
                       allow_pickle: bool = False) -> dict:
    """Released student (model.pt / ode_audio_init.pt) or any saved state dict -> merged state dict, our names."""
    state, _ = read_state_dict(path, use_ema=use_ema, allow_pickle=allow_pickle)
    return convert_state_dict(state, lora_alpha=lora_alpha, lora_rank=lora_rank, lora_scale=lora_scale)[0]


def _in_dim_of(cfg) -> int | None:
    if cfg is None:
        return None
    if isinstance(cfg, int):
        return cfg
    if hasattr(cfg, "in_dim"):
        return int(cfg.in_dim)
    return int(cfg["in_dim"]) if "in_dim" in cfg else None


def load_wan_base_dit(path_or_folder, cfg=None) -> dict:
    """Base Wan2.1 DiT (original safetensors, sharded or not, or the diffusers layout) -> our names.

    ``cfg`` (a DiTConfig, the ``model:`` config section or an int) gives the in_dim the patch embedding is
    widened to (16 -> 33, new channels zero).  The audio modules are absent: the model keeps its own init.
    """
    state, _ = read_state_dict(path_or_folder)
    state = convert_state_dict(state)[0]
    in_dim = _in_dim_of(cfg)
    if in_dim is not None:
        state = expand_patch_embedding(state, in_dim)[0]
    return state


def infer_dit_config(state: dict) -> dict:
    """Model config values readable from a state dict in our naming (used to explain mismatches).

    num_heads cannot be read from weights; it is guessed with Wan's head dim 128 when dim % 128 == 0.
    ``num_audio_layers`` counts ``audio_cond_projs`` (compare with the config's ``audio_layers`` range).
    """
    def get(key):
        return state.get(key, state.get(key.replace(".weight", ".base_layer.weight")))

    out: dict = {}
    pe = get("patch_embedding.weight")
    if pe is not None and pe.dim() == 5:
        out["dim"], out["in_dim"] = int(pe.shape[0]), int(pe.shape[1])
        out["patch_size"] = [int(s) for s in pe.shape[2:]]
        if out["dim"] % 128 == 0:
            out["num_heads"] = out["dim"] // 128
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers:
        out["num_layers"] = max(layers) + 1
    for name, key, dim in (("ffn_dim", "blocks.0.ffn.0.weight", 0), ("text_dim", "text_embedding.0.weight", 1),
                           ("freq_dim", "time_embedding.0.weight", 1), ("audio_proj_dim", "audio_proj.proj.weight", 0),
                           ("audio_dim", "audio_proj.proj.weight", 1)):
        w = get(key)
        if w is not None and w.dim() == 2:
            out[name] = int(w.shape[dim])
    head = get("head.head.weight")
    if head is not None and "patch_size" in out:
        out["out_dim"] = int(head.shape[0]) // math.prod(out["patch_size"])
    if layers:
        out["qk_norm"] = "blocks.0.self_attn.norm_q.weight" in state
        out["cross_attn_norm"] = "blocks.0.norm3.weight" in state
    out["num_audio_layers"] = len({k.split(".")[1] for k in state if k.startswith("audio_cond_projs.")})
    return out


def _config_hint(state: dict, cfg) -> str:
    """'config model.X=a does not match the checkpoint (b); ...' for every readable disagreement."""
    ckpt = infer_dit_config(state)
    bad = []
    for name in ("dim", "num_layers", "ffn_dim", "in_dim", "out_dim", "text_dim", "freq_dim", "patch_size",
                 "audio_dim", "audio_proj_dim"):
        ours = getattr(cfg, name, None)
        if name == "patch_size" and ours is not None:
            ours = list(ours)
        if name in ckpt and ours is not None and ours != ckpt[name]:
            bad.append(f"config model.{name}={ours} does not match the checkpoint ({ckpt[name]})")
    n_audio = len(getattr(cfg, "audio_block_ids", []))
    if ckpt["num_audio_layers"] and n_audio != ckpt["num_audio_layers"]:
        bad.append(f"config model.audio_layers={list(cfg.audio_layers)} gives {n_audio} audio layers, the checkpoint has "
                   f"{ckpt['num_audio_layers']}")
    if bad and "num_heads" in ckpt and ckpt["num_heads"] != getattr(cfg, "num_heads", None):
        bad.append(f"model.num_heads is probably {ckpt['num_heads']} (head dim 128)")
    return "; ".join(bad)


def load_dit(model, path, *, use_ema: bool = False, strict: bool = True, lora_alpha: float = DEFAULT_LORA_ALPHA,
             lora_rank: int | None = None, lora_scale: float | None = None, allow_pickle: bool = False) -> LoadReport:
    """Load any accepted DiT checkpoint into ``model`` (a WanDiT) and report what was done.

    Formats: released student .pt (generator / generator_ema, FSDP names, PEFT LoRA merged), a saved state dict
    (.pt or .safetensors, e.g. from scripts/convert_checkpoint.py), the original Wan2.1 safetensors (file,
    shards + index, or folder) and the diffusers layout (folder or its transformer/).  A checkpoint without
    audio modules is a base Wan2.1: its patch embedding is widened to the model's in_dim (new channels zero)
    and the audio modules keep the model's init (``report.newly_initialized``).  Shape mismatches always
    raise; missing / unexpected keys raise when ``strict``.
    """
    raw, container = read_state_dict(path, use_ema=use_ema, allow_pickle=allow_pickle)
    state, info = convert_state_dict(raw, lora_alpha=lora_alpha, lora_rank=lora_rank, lora_scale=lora_scale)
    del raw
    base = not has_audio(state)
    expanded: list[str] = []
    if base:
        state, expanded = expand_patch_embedding(state, model.cfg.in_dim)

    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    newly = [k for k in missing if base and k.startswith(AUDIO_PREFIXES)]
    missing = [k for k in missing if k not in newly]
    if strict and (missing or unexpected):
        hint = _config_hint(state, model.cfg)
        what = []
        if missing:
            what.append(f"{len(missing)} missing keys ({_preview(missing)})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
        fix = hint or ("it is not a Wan2.1 / AvatarForcing DiT checkpoint: pass the released model.pt, a Wan2.1 "
                       "folder or a diffusers transformer/ folder" if not set(state) & set(target)
                       else "check that the file is complete and matches the model, or load with strict=False")
        raise AvatarForcingError(f"{path} does not match the model: {', '.join(what)}; {fix}")

    for key in (k for k in state if k in target):
        if tuple(state[key].shape) != tuple(target[key].shape):
            hint = _config_hint(state, model.cfg) or "check the model: section of the config"
            raise AvatarForcingError(f"{path}: {key} has shape {list(state[key].shape)} in the checkpoint but "
                                     f"{list(target[key].shape)} in the model; {hint}")

    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    report = LoadReport(str(path), container, info["naming"], sum(k in target for k in state), use_ema,
                        info["lora_merged"], expanded, newly, missing if not strict else [], unexpected if not strict else [])
    if newly:
        log.warning("%s has no audio modules (a base Wan2.1 DiT): %d audio tensors keep their initialization",
                    path, len(newly))
    return report


# ---- writing ----------------------------------------------------------------------------------------

def _owned(state: dict) -> dict:
    """Contiguous CPU tensors that share no storage (what safetensors requires)."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def export_released(state_dict_generator: dict, path, ema_state: dict | None = None) -> None:
    """Write the released layout {'generator': {'model.' + k: v}, 'generator_ema': ...} (read by load_dit)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"generator": {"model." + k: v.detach().cpu() for k, v in state_dict_generator.items()}}
    if ema_state is not None:
        obj["generator_ema"] = {"model." + k: v.detach().cpu() for k, v in ema_state.items()}
    torch.save(obj, path)


def convert_checkpoint(src, dst, *, use_ema: bool = False, lora_alpha: float = DEFAULT_LORA_ALPHA,
                       lora_rank: int | None = None, lora_scale: float | None = None,
                       allow_pickle: bool = False) -> str:
    """Any accepted checkpoint -> a merged plain safetensors state dict in our naming.  Returns a summary line.

    A base Wan2.1 stays as it is (in_dim 16, no audio); load_dit widens it when it loads it.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise AvatarForcingError(f"output {dst} must end in .safetensors (the converter writes a safetensors state dict)")
    raw, container = read_state_dict(src, use_ema=use_ema, allow_pickle=allow_pickle)
    state, info = convert_state_dict(raw, lora_alpha=lora_alpha, lora_rank=lora_rank, lora_scale=lora_scale)
    from safetensors.torch import save_file
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(_owned(state), str(dst), metadata={"format": "pt", "source": Path(src).name})
    cfg = infer_dit_config(state)
    return (f"wrote {dst}: {len(state)} tensors from {src} ({container}, {info['naming']} names"
            + (", EMA" if use_ema else "") + f"), merged LoRA into {info['lora_merged']} linears, "
            f"dim {cfg.get('dim')}, {cfg.get('num_layers')} layers, in_dim {cfg.get('in_dim')}, "
            f"{'audio modules present' if has_audio(state) else 'no audio modules (base Wan2.1)'}")
