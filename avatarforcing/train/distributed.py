"""Processes of a training run: accelerate setup, FSDP2 sharding, gradient averaging, full state dicts.

:class:`Processes` wraps :class:`accelerate.Accelerator` (``accelerate launch`` / ``torchrun``; gloo on CPU,
NCCL on GPU) with mixed precision by autocast (``train.mixed_precision: bf16`` on GPU) and gradient
accumulation (``train.grad_accum``: :meth:`Accelerator.accumulate` / :meth:`Accelerator.backward`).

Data parallelism: parameters are broadcast from rank 0 at start and gradients are averaged over processes
after the accumulation micro-steps, in buckets (:meth:`Processes.average_gradients`).  Not DDP hooks
(``accelerator.prepare``): the streaming rollout calls the model several times per backward, with and without
grad, and uses model methods other than ``forward``.  ``train.fsdp: true`` instead shards each network with
torch FSDP2 (``fully_shard``; units: every block's self-attention and FFN, and the root; cross-attention,
embeddings, modulation and head stay in the root unit because the model computes all text K/V before the
blocks run).  With FSDP the DMD rollout's prompt K/V are computed without grad (:func:`full_params`), the EMA
is sharded like the weights, and checkpoints hold full state dicts (torch.distributed.checkpoint.state_dict).
FSDP2 runs on CPU with gloo, which is how it is smoke-tested here; GPU runs (NCCL, bf16) are untested.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

from .. import AvatarForcingError
from ..model import WanAttentionBlock


class Processes:
    """The accelerate processes of a run: rank, world, device, autocast, accumulation and collectives."""

    def __init__(self, tc):
        from accelerate import Accelerator
        mp = str(tc.mixed_precision)
        if mp not in ("no", "bf16"):
            raise AvatarForcingError(f"train.mixed_precision '{mp}' is not supported; use 'no' or 'bf16'")
        dev = str(tc.device)
        cpu = dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())
        if cpu and mp == "bf16" and dev == "auto":
            mp = "no"  # bf16 autocast on CPU is slow and not what the paper configs mean
        self.grad_accum = int(tc.grad_accum)
        if self.grad_accum < 1:
            raise AvatarForcingError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        self.acc = Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=self.grad_accum)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.device = self.acc.device
        self.fsdp = bool(tc.fsdp) and self.world > 1      # one process: nothing to shard

    def autocast(self):
        return self.acc.autocast()

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def place(self, model: torch.nn.Module, trainable: bool) -> torch.nn.Module:
        """On the device; frozen networks eval/no-grad (bf16 weights under bf16); broadcast or FSDP-sharded."""
        from accelerate.utils import broadcast
        model.to(self.device)
        if not trainable:
            model.requires_grad_(False).eval()
            if self.acc.mixed_precision == "bf16":
                model.to(torch.bfloat16)   # frozen teacher: bf16 weights
        if self.world > 1 and not self.fsdp:
            with torch.no_grad():
                broadcast([t.data for t in list(model.parameters()) + list(model.buffers())], from_process=0)
        if self.fsdp:
            model = fsdp_wrap(model)
        return model

    def average_gradients(self, params: list, bucket_elems: int = 1 << 24) -> None:
        """Mean of the gradients over processes (no-op with one process or FSDP, which reduces them itself).

        accelerate's ``reduce`` is one collective per tensor; the gradients are flattened into fp32 buckets of
        ``bucket_elems`` first (as DDP does) so a 1.3B network takes a few collectives, not hundreds."""
        if self.world == 1 or self.fsdp:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        i = 0
        while i < len(params):
            chunk, n = [], 0
            while i < len(params) and (not chunk or n + params[i].numel() <= bucket_elems):
                chunk.append(params[i])
                n += params[i].numel()
                i += 1
            flat = self.acc.reduce(torch.cat([p.grad.reshape(-1).float() for p in chunk]), reduction="mean")
            off = 0
            for p in chunk:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
                off += p.numel()

    def reduce_mean(self, metrics: dict) -> dict:
        """Numeric metrics averaged over processes (float64); other values as they are."""
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        t = self.acc.reduce(t, reduction="mean")
        return {**metrics, **{k: float(v) for k, v in zip(keys, t.tolist())}}

    def close(self) -> None:
        import torch.distributed as dist
        if self.world > 1 and dist.is_initialized():
            self.barrier()


# ---- FSDP2 ------------------------------------------------------------------------------------------------

def fsdp_wrap(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard every block's self-attention and FFN as units, the rest in the root unit."""
    from torch.distributed.fsdp import fully_shard
    for m in model.modules():
        if isinstance(m, WanAttentionBlock):
            fully_shard(m.self_attn)
            fully_shard(m.ffn)
    fully_shard(model)
    return model


def is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def local(t):
    """A DTensor's full value (collective) or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def full_params(model):
    """The root unit's parameters unsharded inside the block (all ranks must enter); no-op without FSDP.

    Enough for the prompt K/V (text embedding and cross-attention live in the root unit)."""
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ---- full state dicts ---------------------------------------------------------------------------------------

def full_state_dict(model) -> dict:
    """CPU state dict of the whole network (collective under FSDP: rank 0 gets it, other ranks {})."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_full_state_dict(model, sd: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(sd)


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer's state with full (unsharded) tensors (collective under FSDP)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state_dict(model, optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        # strict=False: parameters that never received a gradient (DMD's text path under FSDP) have no state
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        optimizer.load_state_dict(state)


def param_digest(model) -> str:
    """sha256 of all parameters (bytes, name order): equal digests = bit-identical networks (collective with FSDP)."""
    h = hashlib.sha256()
    for n, p in sorted(full_state_dict(model).items()):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
