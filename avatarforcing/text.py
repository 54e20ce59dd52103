"""Text conditioning: umT5-XXL encoder embeddings, [B, text_len=512, 4096], real length then zeros.

Backends:
- transformers `UMT5EncoderModel` + tokenizer from a local folder (:meth:`TextEncoder.from_pretrained`),
- the original Wan2.1 file `models_t5_umt5-xxl-enc-bf16.pth` converted on load
  (:meth:`TextEncoder.from_wan_checkpoint`, key mapping in SPEC section 8),
- `none`: zeros, for the synthetic world and text-free runs (:meth:`TextEncoder.none`).
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from torch import nn

from . import AvatarForcingError

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
    def _encode_new(self, prompts: list[str]) -> None:
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding=True, truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=tok.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        for prompt, h, n in zip(prompts, hidden, mask.sum(1).tolist()):
            self._cache[prompt] = h[:n]  # [len, text_dim]

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


def build_text_encoder(cfg_text, text_dim: int, text_len: int = 512, dtype=torch.float32) -> TextEncoder:
    """Text encoder from the `text:` config section; text_dim / text_len come from the DiT config."""
    kind = cfg_text.get("encoder", "umt5")
    if kind == "none":
        return TextEncoder.none(text_dim, text_len)
    if kind != "umt5":
        raise AvatarForcingError(f"text.encoder '{kind}' is not known; use umt5 or none")
    if not cfg_text.get("path"):
        raise AvatarForcingError("text.path is not set; pass text.path=<Wan2.1 folder> (with "
                                 f"{WAN_T5_FILE} and {WAN_TOKENIZER_DIR}) or text.encoder=none")
    path, tokenizer = Path(cfg_text["path"]), cfg_text.get("tokenizer")
    if path.is_file():
        enc = TextEncoder.from_wan_checkpoint(path, tokenizer or path.parent / WAN_TOKENIZER_DIR, text_len, dtype)
    elif (path / WAN_T5_FILE).is_file():
        enc = TextEncoder.from_wan_checkpoint(path / WAN_T5_FILE, tokenizer or path / WAN_TOKENIZER_DIR, text_len, dtype)
    elif (path / "text_encoder" / "config.json").is_file():  # diffusers pipeline folder
        enc = TextEncoder.from_pretrained(path / "text_encoder", tokenizer or path / "tokenizer", text_len, dtype)
    elif (path / "config.json").is_file():
        enc = TextEncoder.from_pretrained(path, tokenizer, text_len, dtype)
    else:
        raise AvatarForcingError(f"text.path {path} holds no umT5 encoder; pass the Wan2.1 folder (with {WAN_T5_FILE}), "
                                 "a transformers UMT5EncoderModel folder, or text.encoder=none")
    if enc.text_dim != text_dim:
        raise AvatarForcingError(f"text encoder width {enc.text_dim} does not match model.text_dim {text_dim}; "
                                 "use the matching umT5 checkpoint or fix model.text_dim")
    return enc
