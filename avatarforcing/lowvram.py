"""Memory options of inference (``inference.quantize | offload | low_vram``), applied to the built components.

    apply_memory_options(model, vae, audio_encoder, text_encoder, cfg.inference, device)   # in from_config

quantize: fp8   weight-only float8 (e4m3, one scale per output row) of the linear layers of the DiT's 30
                blocks with torchao (optional extra: ``pip install -e .[fp8]``): 1 byte per weight instead
                of 2 (-1.3 GiB); the matmuls still run in the model dtype (weights dequantized on the fly).
                Embeddings, time / audio projections and the head stay in bf16.
offload: model  the DiT and the VAE take turns on the GPU (accelerate hooks): calling one (its forward, or
                the DiT's text K/V) moves it there and the other to the CPU.  So the DiT leaves the GPU while
                a block is decoded and comes back for the next step.  Its patch embedding (0.2 M parameters)
                stays: the sampler reads the DiT's device from it.  wav2vec2 (0.18 GiB) stays too: the audio
                code reads its device between calls.  Moving the weights costs PCIe time every step; CUDA-graph
                compile modes (which capture weights by address) are refused with it.  On the CPU it changes
                nothing.
low_vram: true  the preset for an 8 GB GPU (measured by scripts/bench_memory.py): the DiT's FFN in chunks of
                ``LOW_VRAM_FFN_CHUNK`` tokens, the VAE decoder on one latent frame per call with its causal
                cache parked on the CPU between blocks, umT5 on the CPU, and offload=model.  The outputs are
                those of the default mode.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn

from . import AvatarForcingError

log = logging.getLogger(__name__)

LOW_VRAM_FFN_CHUNK = 4096            # tokens per FFN chunk: [4096, 8960] bf16 = 70 MiB instead of 427 MiB
QUANTIZE = ("none", "fp8")
OFFLOAD = ("none", "model")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class MemoryOptions:
    quantize: str = "none"
    offload: str = "none"
    low_vram: bool = False

    @classmethod
    def from_config(cls, inf) -> "MemoryOptions":
        get = inf.get if hasattr(inf, "get") else (lambda k, d=None: getattr(inf, k, d))
        quantize = str(get("quantize", "none") or "none").lower()
        offload = str(get("offload", "none") or "none").lower()
        if quantize not in QUANTIZE:
            raise AvatarForcingError(f"inference.quantize is '{quantize}'; use none or fp8")
        if offload not in OFFLOAD:
            raise AvatarForcingError(f"inference.offload is '{offload}'; use none or model")
        low = get("low_vram", False)
        if not isinstance(low, bool):
            raise AvatarForcingError(f"inference.low_vram is '{low}'; use true or false")
        return cls(quantize, "model" if low else offload, low)


def apply_memory_options(model, vae, audio_encoder, text_encoder, inf, device) -> dict:
    """Apply ``inference.quantize / offload / low_vram`` in place; returns what was applied (for logs and tests)."""
    device = torch.device(device)
    opts = MemoryOptions.from_config(inf)
    applied: dict = {"quantize": opts.quantize, "offload": "none", "low_vram": opts.low_vram}
    if opts.quantize == "fp8":
        applied["fp8_linears"] = quantize_fp8(model, device)
    if opts.low_vram:
        model.set_ffn_chunk(LOW_VRAM_FFN_CHUNK)
        applied["ffn_chunk_tokens"] = LOW_VRAM_FFN_CHUNK
        if hasattr(vae, "decode_frames_per_call"):
            vae.decode_frames_per_call = 1
            vae.decode_offload_cache = device.type == "cuda"
            applied["vae_frames_per_call"] = 1
        if hasattr(text_encoder, "device_policy"):
            text_encoder.device_policy = "cpu"
            applied["text_device"] = "cpu"
    if opts.offload == "model":
        compile_mode = str(inf.get("compile_mode", "default")) if hasattr(inf, "get") else "default"
        if hasattr(inf, "get") and inf.get("compile", False) and compile_mode in _CUDA_GRAPH_MODES:
            raise AvatarForcingError(f"inference.offload=model moves the DiT's weights, which CUDA graphs "
                                     f"(compile_mode={compile_mode}) capture by address; use compile_mode=default "
                                     "or offload=none")
        if device.type != "cuda":
            log.info("note: inference.offload=model changes nothing on %s (the components already live in host "
                     "memory)", device)
        else:
            group = offload_model(model, vae, audio_encoder, device)
            applied["offload"] = "model"
            applied["offloaded"] = list(group.parts)
    return applied


# ----------------------------------------------------------------------------------------------
# fp8 weights


def _dit_block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def quantize_fp8(model: nn.Module, device: torch.device) -> int:
    """Float8 weight-only quantization (torchao) of the linear layers in ``model.blocks``; returns their count."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError:
        raise AvatarForcingError("inference.quantize=fp8 needs torchao; install it with pip install -e .[fp8] "
                                 "(or pip install torchao), or set inference.quantize=none") from None
    config = Float8WeightOnlyConfig(set_inductor_config=False)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    try:                                   # a tiny layer first: fail in one line, not deep inside the model
        probe = nn.Sequential(nn.Linear(64, 64)).to(device, model.dtype if hasattr(model, "dtype") else None)
        quantize_(probe, config)
        with torch.no_grad():
            probe(torch.randn(2, 64, device=device, dtype=probe[0].bias.dtype))
    except Exception as exc:  # noqa: BLE001 - any failure of the kernels means: not here
        cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        need = f" (compute capability {cc[0]}.{cc[1]}; float8 kernels need >= 8.9)" if cc else ""
        raise AvatarForcingError(f"inference.quantize=fp8 does not run on {where}{need}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}; use a GPU with compute capability "
                                 ">= 8.9 and torchao >= 0.10, or inference.quantize=none") from None
    count = sum(1 for name, m in model.named_modules() if _dit_block_linear(m, name))
    quantize_(model, config, filter_fn=_dit_block_linear)
    log.info("fp8 weight-only quantization of %d linear layers of the DiT (torchao)", count)
    return count


# ----------------------------------------------------------------------------------------------
# model CPU offload


class OffloadGroup:
    """Components that take turns on ``device``: using one moves it there and every other one to the CPU.

    parts: name -> the modules that move; triggers (via :meth:`add`) are modules whose forward uses a part."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.parts: dict[str, list[nn.Module]] = {}
        self.active: str | None = None
        self.moves = 0

    def add(self, name: str, modules: list[nn.Module], triggers: list[nn.Module]) -> None:
        self.parts[name] = list(modules)
        for m in self.parts[name]:
            m.to("cpu")
        for t in triggers:
            add_hook_to_module(t, _Onload(self, name), append=True)

    def onload(self, name: str) -> None:
        if self.active == name:
            return
        for other, mods in self.parts.items():
            if other != name:
                for m in mods:
                    m.to("cpu")
        for m in self.parts[name]:
            m.to(self.device)
        self.active = name
        self.moves += 1

    def offload_all(self) -> None:
        for mods in self.parts.values():
            for m in mods:
                m.to("cpu")
        self.active = None


class _Onload(ModelHook):
    """Bring the part on the device before the forward; move top-level tensor arguments there too
    (containers stay as they are: the VAE's causal cache list is updated in place by the decoder)."""

    def __init__(self, group: OffloadGroup, name: str):
        self.group, self.name = group, name

    def pre_forward(self, module, *args, **kwargs):
        self.group.onload(self.name)
        dev = self.group.device

        def move(x):
            return x.to(dev) if isinstance(x, torch.Tensor) and x.device != dev and x.device.type != "meta" else x

        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def offload_model(model, vae, audio_encoder, device: torch.device) -> OffloadGroup:
    """Model CPU offload of the DiT and the VAE (WanVAE) with accelerate hooks.

    The audio encoder stays on the device: AudioFeatureExtractor.encode builds rows on ``encoder.device``
    (read from its weights) next to the model's output, which would then sit on two devices."""
    group = OffloadGroup(device)
    keep = {"patch_embedding"}                 # the DiT's device / dtype are read from it between forwards
    group.add("dit", [m for n, m in model.named_children() if n not in keep], [model, model.text_embedding])
    inner = getattr(vae, "model", None)
    if inner is not None and all(hasattr(inner, n) for n in ("encoder", "decoder", "quant_conv", "post_quant_conv")):
        group.add("vae", [inner], [inner.encoder, inner.decoder, inner.quant_conv, inner.post_quant_conv])
    log.info("model CPU offload: %s take turns on %s", ", ".join(group.parts), device)
    return group
