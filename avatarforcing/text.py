"""Text conditioning: umT5-XXL encoder embeddings, [B, text_len=512, 4096], real length then zeros.

Backends:
- transformers `UMT5EncoderModel` + tokenizer from a local folder (:meth:`TextEncoder.from_pretrained`),
- the original Wan2.1 file `models_t5_umt5-xxl-enc-bf16.pth` converted on load
  (:meth:`TextEncoder.from_wan_checkpoint`, key mapping in docs/spec.md section 8),
- `none`: zeros, for the synthetic world and text-free runs (:meth:`TextEncoder.none`).

umT5-XXL is ~11 GB in bf16, more than the whole streaming model: :func:`build_text_encoder` returns a
:class:`LazyTextEncoder` that loads it only for a prompt missing from its caches (in memory and on disk,
``text.cache_dir``), on the GPU if it fits there or on the CPU (``text.device``), and frees it again after
encoding unless ``text.keep_loaded``.
"""
from __future__ import annotations

import gc
import hashlib
import html
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import AvatarForcingError

log = logging.getLogger(__name__)

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"

# original Wan T5 name (after "blocks.{i}.") -> transformers UMT5EncoderModel name (after "encoder.block.{i}.")
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {"norm.weight": "encoder.final_layer_norm.weight"}
_EMBEDDING = "token_embedding.weight"  # -> shared.weight and encoder.embed_tokens.weight


def wan_t5_to_transformers(state_dict: dict) -> tuple[dict, list[str]]:
    """Original Wan umT5 encoder state dict -> (UMT5EncoderModel state dict, unrecognized original keys)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key == _EMBEDDING:
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = value
        elif key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif m and m[2] in _BLOCK_KEYS:
            out[f"encoder.block.{m[1]}.{_BLOCK_KEYS[m[2]]}"] = value
        else:
            unknown.append(key)
    return out, unknown


def transformers_to_wan_key(key: str) -> str:
    """UMT5EncoderModel parameter name -> original Wan name (for error messages and test checkpoints)."""
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return _EMBEDDING
    for orig, new in _TOP_KEYS.items():
        if key == new:
            return orig
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    for orig, new in _BLOCK_KEYS.items():
        if m and m[2] == new:
            return f"blocks.{m[1]}.{orig}"
    raise KeyError(key)


def _umt5_config_from_wan(sd: dict, path: Path):
    """Infer the UMT5Config from tensor shapes (umT5-XXL: 24 layers, 4096 wide, 64 heads, ffn 10240)."""
    from transformers import UMT5Config
    needed = [_EMBEDDING, "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight", "blocks.0.pos_embedding.embedding.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise AvatarForcingError(f"{path.name} is not a Wan umT5 encoder checkpoint: missing keys {missing}; "
                                 f"pass the original {WAN_T5_FILE}")
    vocab, d_model = sd[_EMBEDDING].shape
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=sd["blocks.0.attn.q.weight"].shape[0] // num_heads,
                      d_ff=sd["blocks.0.ffn.fc1.weight"].shape[0], num_layers=num_layers, num_heads=num_heads,
                      relative_attention_num_buckets=num_buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)


def _load_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise AvatarForcingError(f"tokenizer folder not found: {tokenizer_dir}; pass the google/umt5-xxl tokenizer "
                                 "folder (text.tokenizer=...)")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AvatarForcingError(f"cannot load tokenizer from {tokenizer_dir} ({str(exc).splitlines()[0]}); "
                                 "pass the google/umt5-xxl tokenizer folder") from None


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: fix mojibake (if ftfy is installed), unescape HTML, collapse whitespace."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder(nn.Module):
    """prompts -> [B, text_len, text_dim]: umT5 embeddings of the real tokens (incl. </s>), zero-padded.

    Embeddings are cached per prompt (the prompt of a stream is encoded once)."""

    def __init__(self, model=None, tokenizer=None, text_dim: int | None = None, text_len: int = 512):
        super().__init__()
        if model is None and text_dim is None:
            raise AvatarForcingError("TextEncoder without a model needs text_dim")
        self.model = None if model is None else model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_dim = model.config.d_model if model is not None else int(text_dim)
        self.text_len = text_len
        self._cache: dict[str, torch.Tensor] = {}
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # tracks device/dtype for `none`

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def none(cls, text_dim: int, text_len: int = 512) -> "TextEncoder":
        return cls(None, None, text_dim, text_len)

    @classmethod
    def from_pretrained(cls, path, tokenizer_dir=None, text_len: int = 512, dtype=torch.float32) -> "TextEncoder":
        """transformers folder with an UMT5EncoderModel (config.json + weights); tokenizer in it or tokenizer_dir."""
        from transformers import UMT5EncoderModel
        path = Path(path)
        if not (path / "config.json").is_file():
            raise AvatarForcingError(f"umT5 folder not found or incomplete: {path}; pass a folder with config.json "
                                     f"and weights, or the Wan2.1 folder holding {WAN_T5_FILE}")
        try:
            model = UMT5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise AvatarForcingError(f"cannot load umT5 encoder from {path} ({str(exc).splitlines()[0]}); "
                                     "pass a transformers UMT5EncoderModel folder") from None
        return cls(model, _load_tokenizer(tokenizer_dir or path), text_len=text_len)

    @classmethod
    def from_wan_checkpoint(cls, pth_path, tokenizer_dir, text_len: int = 512, dtype=torch.float32) -> "TextEncoder":
        """Original `models_t5_umt5-xxl-enc-bf16.pth` (Wan naming), converted strictly into UMT5EncoderModel."""
        from transformers import UMT5EncoderModel
        path = Path(pth_path)
        if not path.is_file():
            raise AvatarForcingError(f"umT5 checkpoint not found: {path}; pass the Wan2.1 {WAN_T5_FILE}")
        tokenizer = _load_tokenizer(tokenizer_dir)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # corrupt / not a torch file
            raise AvatarForcingError(f"cannot read {path} ({type(exc).__name__}); pass the Wan2.1 {WAN_T5_FILE}") from None
        config = _umt5_config_from_wan(sd, path)
        converted, unexpected = wan_t5_to_transformers({k: v.to(dtype) for k, v in sd.items()})
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        missing = sorted({transformers_to_wan_key(k) for k in model.state_dict() if k not in converted})
        if missing or unexpected:
            raise AvatarForcingError(
                f"{path.name} does not match the Wan umT5 encoder layout: missing keys {_short(missing)}, "
                f"unexpected keys {_short(sorted(unexpected))}; pass the original {WAN_T5_FILE}")
        try:
            model.load_state_dict(converted, strict=True, assign=True)
        except RuntimeError as exc:
            raise AvatarForcingError(f"{path.name}: tensor shapes do not match the umT5 layout "
                                     f"({str(exc).splitlines()[-1].strip()}); pass the original {WAN_T5_FILE}") from None
        return cls(model, tokenizer, text_len=text_len)

    # -- encoding ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype if self.model is not None else torch.float32

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per prompt the embeddings of its real tokens (incl. </s>): [len_i, text_dim], len_i <= text_len."""
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding=True, truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=tok.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return [h[:n] for h, n in zip(hidden, mask.sum(1).tolist())]

    def _encode_new(self, prompts: list[str]) -> None:
        for prompt, emb in zip(prompts, self.embed(prompts)):
            self._cache[prompt] = emb  # [len, text_dim]

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """-> [B, text_len, text_dim]; rows past each prompt's token count are zeros."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = torch.zeros(len(prompts), self.text_len, self.text_dim, device=self.device, dtype=self.dtype)
        if self.model is None:
            return out
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            self._encode_new(new)
        for i, prompt in enumerate(prompts):
            emb = self._cache[prompt]
            out[i, :len(emb)] = emb
        return out


def _short(keys: list[str], n: int = 8) -> str:
    return str(keys[:n])[:-1] + (f", ... {len(keys) - n} more]" if len(keys) > n else "]")


# ----------------------------------------------------------------------------------------------
# loaded only when needed, with a prompt-embedding cache

_CACHE_VERSION = 1
_TEXT_DEVICES = ("auto", "cpu")


def file_fingerprint(paths: list[Path]) -> list[list]:
    """Identity of model files for cache keys: [resolved path, size, mtime_ns] each (weights, not contents)."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


class LazyTextEncoder(nn.Module):
    """prompts -> [B, text_len, text_dim] like :class:`TextEncoder`, loading umT5 only on a cache miss.

    Per prompt the real-token embeddings [len, text_dim] are looked up in memory, then in ``cache_dir``
    (one file per prompt, named by a hash of the prompt, the encoder files' path / size / mtime, text_len
    and dtype); only the prompts found in neither are encoded.  The encoder is loaded for them on
    ``run_device()`` (``device_policy`` auto: this module's device if the weights fit in its free memory,
    else the CPU; cpu: always the CPU) and freed afterwards unless ``keep_loaded``.  ``loads`` counts loads.
    The output is on this module's device (``.to(device)``), in ``dtype``."""

    def __init__(self, loader: Callable[[torch.device], TextEncoder], model_files: list[Path], text_dim: int,
                 text_len: int = 512, dtype: torch.dtype = torch.float32, device_policy: str = "auto",
                 cache_dir: str | os.PathLike | None = None, keep_loaded: bool = False):
        super().__init__()
        if device_policy not in _TEXT_DEVICES:
            raise AvatarForcingError(f"text.device is '{device_policy}'; use auto (the GPU if umT5 fits, else the "
                                     "CPU) or cpu")
        self.loader, self.model_files = loader, [Path(p) for p in model_files]
        self.text_dim, self.text_len, self.dtype = int(text_dim), int(text_len), dtype
        self.device_policy, self.keep_loaded = device_policy, bool(keep_loaded)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.encoder: TextEncoder | None = None
        self.loads = 0
        self._memory: dict[str, torch.Tensor] = {}     # prompt -> [len, text_dim] on the CPU
        self._fingerprint = file_fingerprint(self.model_files)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)   # tracks the output device

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # -- cache -------------------------------------------------------------------------------

    def cache_key(self, prompt: str) -> str:
        """Hash of the prompt and the encoder (files, text_len, dtype): the cache file's name."""
        ident = {"v": _CACHE_VERSION, "prompt": prompt, "model": self._fingerprint, "text_len": self.text_len,
                 "dtype": str(self.dtype).replace("torch.", "")}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def cache_path(self, prompt: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self.cache_key(prompt)}.pt"

    def _read_cached(self, prompt: str) -> torch.Tensor | None:
        path = self.cache_path(prompt)
        if path is None or not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            emb = data["embedding"]
            ok = (data.get("key") == self.cache_key(prompt) and isinstance(emb, torch.Tensor) and emb.ndim == 2
                  and emb.shape[1] == self.text_dim and 0 < emb.shape[0] <= self.text_len)
            if not ok:
                raise ValueError("unexpected content")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is re-encoded
            log.warning("prompt cache file %s is unreadable (%s); encoding the prompt again", path,
                        type(exc).__name__ if not isinstance(exc, ValueError) else exc)
            return None
        return emb.to(self.dtype)

    def _write_cached(self, prompt: str, emb: torch.Tensor) -> None:
        path = self.cache_path(prompt)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"key": self.cache_key(prompt), "prompt": prompt, "embedding": emb}, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the prompt cache %s (%s); set text.cache_dir to a writable folder or null",
                        path, exc.strerror or exc)

    def clear_cache(self) -> None:
        """Forget the in-memory embeddings (the files in cache_dir stay)."""
        self._memory.clear()

    # -- the encoder -------------------------------------------------------------------------

    def run_device(self) -> torch.device:
        """Where umT5 runs: the output device if it is a GPU with room for the weights (policy auto), else the CPU."""
        if self.device_policy == "cpu" or self.device.type != "cuda":
            return torch.device("cpu")
        need = sum(f[1] for f in self._fingerprint) * torch.finfo(self.dtype).bits // 16 + 2 ** 30  # + activations
        free, _ = torch.cuda.mem_get_info(self.device)
        if free < need:
            log.info("note: umT5 needs ~%.1f GiB but %s has %.1f GiB free; encoding the prompt on the CPU "
                     "(text.device=cpu skips this check)", need / 2 ** 30, self.device, free / 2 ** 30)
            return torch.device("cpu")
        return self.device

    def load(self) -> TextEncoder:
        if self.encoder is None:
            device = self.run_device()
            self.encoder = self.loader(device).to(device)
            self.loads += 1
        return self.encoder

    def unload(self) -> None:
        """Free the umT5 weights (GPU memory is returned to the device)."""
        if self.encoder is None:
            return
        on_gpu = self.encoder.device.type == "cuda"
        self.encoder = None
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """-> [B, text_len, text_dim]; rows past each prompt's token count are zeros."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = []
        for p in dict.fromkeys(prompts):
            if p not in self._memory:
                emb = self._read_cached(p)
                if emb is None:
                    missing.append(p)
                else:
                    self._memory[p] = emb
        if missing:
            try:
                for p, emb in zip(missing, self.load().embed(missing)):
                    self._memory[p] = emb.to("cpu", self.dtype)
                    self._write_cached(p, self._memory[p])
            finally:
                if not self.keep_loaded:
                    self.unload()
        out = torch.zeros(len(prompts), self.text_len, self.text_dim, device=self.device, dtype=self.dtype)
        for i, p in enumerate(prompts):
            emb = self._memory[p]
            out[i, :len(emb)] = emb.to(self.device)
        return out


def _umt5_source(path: Path, tokenizer) -> tuple[str, Path, Path, list[Path]]:
    """text.path -> (kind 'wan' | 'transformers', model path, tokenizer folder, files that identify the model)."""
    tok = Path(tokenizer) if tokenizer else None
    if path.is_file():
        return "wan", path, tok or path.parent / WAN_TOKENIZER_DIR, [path]
    if (path / WAN_T5_FILE).is_file():
        return "wan", path / WAN_T5_FILE, tok or path / WAN_TOKENIZER_DIR, [path / WAN_T5_FILE]
    folder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    if (folder / "config.json").is_file():
        tok = tok or (path / "tokenizer" if folder != path else path)
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        return "transformers", folder, tok, weights
    raise AvatarForcingError(f"text.path {path} holds no umT5 encoder; pass the Wan2.1 folder (with {WAN_T5_FILE}), "
                             "a transformers UMT5EncoderModel folder, or text.encoder=none")


def _umt5_width(kind: str, model_path: Path) -> int:
    """d_model of the encoder without loading its weights (config.json, or the mmap-ed Wan checkpoint)."""
    if kind == "transformers":
        try:
            return int(json.loads((model_path / "config.json").read_text())["d_model"])
        except (OSError, ValueError, KeyError) as exc:
            raise AvatarForcingError(f"cannot read {model_path / 'config.json'} ({type(exc).__name__}); pass a "
                                     "transformers UMT5EncoderModel folder") from None
    try:
        sd = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt / not a torch file
        raise AvatarForcingError(f"cannot read {model_path} ({type(exc).__name__}); pass the Wan2.1 {WAN_T5_FILE}") from None
    if not isinstance(sd, dict) or _EMBEDDING not in sd:
        raise AvatarForcingError(f"{model_path.name} is not a Wan umT5 encoder checkpoint: missing keys [{_EMBEDDING!r}]; "
                                 f"pass the original {WAN_T5_FILE}")
    return int(sd[_EMBEDDING].shape[1])


def build_text_encoder(cfg_text, text_dim: int, text_len: int = 512, dtype=torch.float32,
                       keep_loaded: bool | None = None):
    """Text encoder from the `text:` config section; text_dim / text_len come from the DiT config.

    umt5 -> :class:`LazyTextEncoder` (nothing is loaded here; paths and the width are checked);
    none -> zero embeddings.  keep_loaded: None = ``text.keep_loaded`` (preprocessing of many captions
    passes True)."""
    kind = cfg_text.get("encoder", "umt5")
    if kind == "none":
        return TextEncoder.none(text_dim, text_len)
    if kind != "umt5":
        raise AvatarForcingError(f"text.encoder '{kind}' is not known; use umt5 or none")
    if not cfg_text.get("path"):
        raise AvatarForcingError("text.path is not set; pass text.path=<Wan2.1 folder> (with "
                                 f"{WAN_T5_FILE} and {WAN_TOKENIZER_DIR}) or text.encoder=none")
    source, model_path, tokenizer, files = _umt5_source(Path(cfg_text["path"]), cfg_text.get("tokenizer"))
    if not tokenizer.is_dir():
        raise AvatarForcingError(f"tokenizer folder not found: {tokenizer}; pass the google/umt5-xxl tokenizer "
                                 "folder (text.tokenizer=...)")
    width = _umt5_width(source, model_path)
    if width != text_dim:
        raise AvatarForcingError(f"text encoder width {width} does not match model.text_dim {text_dim}; "
                                 "use the matching umT5 checkpoint or fix model.text_dim")

    def load(device: torch.device) -> TextEncoder:     # read on the CPU; LazyTextEncoder moves it to ``device``
        if source == "wan":
            return TextEncoder.from_wan_checkpoint(model_path, tokenizer, text_len, dtype)
        return TextEncoder.from_pretrained(model_path, tokenizer, text_len, dtype)

    keep = bool(cfg_text.get("keep_loaded", False)) if keep_loaded is None else keep_loaded
    return LazyTextEncoder(load, files, text_dim, text_len, dtype, str(cfg_text.get("device", "auto")),
                           cfg_text.get("cache_dir"), keep)
