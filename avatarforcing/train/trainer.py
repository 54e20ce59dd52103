"""The training loop shared by the teacher, ODE and DMD stages.

Each stage builds its networks and data, registers the trained networks as *roles* (model + AdamW + EMA)
with :class:`Trainer` and implements ``train_step(step) -> metrics``.  The trainer provides:

* processes: :class:`accelerate.Accelerator` (``accelerate launch`` / ``torchrun``; gloo on CPU, NCCL on GPU),
  mixed precision by autocast (``train.mixed_precision: bf16`` on GPU), seeded per-(step, micro-step, rank)
  random generators so that resumed and uninterrupted runs draw the same numbers;
* data parallelism: gradients are averaged over processes by an explicit bucketed all-reduce after the
  accumulation micro-steps (not DDP hooks: the streaming rollout calls the model several times per
  backward, with and without grad, and uses model methods other than ``forward``); parameters are
  broadcast from rank 0 at start.  ``train.fsdp: true`` instead shards each network with torch FSDP2
  (``fully_shard``; units: every block's self-attention and FFN, and the root; cross-attention, embeddings,
  modulation and head stay in the root unit because the model computes all text K/V before the blocks
  run), and ``model.gradient_checkpointing`` recomputes block activations.  With FSDP the DMD rollout's
  prompt K/V are computed without grad (outside a forward), the EMA is sharded like the weights, and
  checkpoints hold full state dicts (torch.distributed.checkpoint.state_dict).  FSDP2 runs on CPU with
  gloo, which is how it is smoke-tested here; GPU runs (NCCL, bf16) are untested;
* AdamW per role, gradient accumulation (``train.grad_accum``), global-norm clipping, EMA
  (``train.ema_decay`` from ``train.ema_start``; a plain copy before);
* logging: tqdm + ``<output_dir>/metrics.jsonl`` on the main process, wandb when ``train.wandb`` (offline
  by default, optional dependency);
* checkpoints ``<output_dir>/checkpoints/step_XXXXXXXX/`` written to a hidden temp directory and renamed
  (atomic): ``state.pt`` (models, EMA, optimizers, LR schedulers, step, data positions, config) and
  ``rank_R.pt`` per process (python / numpy / torch / CUDA RNG states).  ``train.resume: auto`` continues
  from the newest complete one; ``latest`` names it;
* export of the released layout ``{'generator', 'generator_ema'}`` (``checkpoint.export_released``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from .. import AvatarForcingError
from ..model import WanAttentionBlock, build_model
from ..units import stable_seed

log = logging.getLogger("avatarforcing.train")

CKPT_FORMAT = "avatarforcing-train-v1"


# ---- models ---------------------------------------------------------------------------------------------

def build_dit(cfg, init: str | None = None, use_ema: bool = False, what: str = "model"):
    """A WanDiT from ``cfg.model``; weights from ``init`` (any checkpoint ``load_dit`` accepts) or the seeded init."""
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model)
    if init:
        from ..checkpoint import load_dit
        report = load_dit(model, init, use_ema=bool(use_ema))
        log.info("%s initialised from %s", what, getattr(report, "path", init))
    return model


@dataclass
class Role:
    """A trained network: the module as called (maybe FSDP-wrapped), the plain module, AdamW, EMA."""

    name: str
    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: "EMA | None"
    grad_clip: float
    has_ema: bool = False
    params: list = field(default_factory=list)


class EMA:
    """Exponential moving average of a role's parameters (fp32, on the parameters' device)."""

    def __init__(self, named_params, decay: float, start: int):
        self.decay, self.start = float(decay), int(start)
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params, step: int) -> None:
        d = self.decay if step >= self.start else 0.0
        for n, p in named_params:
            s = self.shadow[n]
            if d == 0.0:
                s.copy_(p.detach().float())
            else:
                s.lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict:
        """Full CPU tensors (collective when the parameters are FSDP-sharded DTensors)."""
        return {k: _local(v.detach()).cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            s = self.shadow[k]
            if hasattr(s, "device_mesh"):   # sharded like its parameter
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v.to(s.device, s.dtype), s.device_mesh, s.placements)
            s.copy_(v)


def _fsdp_wrap(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard every block's self-attention and FFN as units, the rest in the root unit."""
    from torch.distributed.fsdp import fully_shard
    for m in model.modules():
        if isinstance(m, WanAttentionBlock):
            fully_shard(m.self_attn)
            fully_shard(m.ffn)
    fully_shard(model)
    return model


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def unwrap(model):
    return model            # FSDP2 shards in place: the module is the network


def _local(t):
    """A DTensor's full value (collective) or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def full_params(model):
    """The root unit's parameters unsharded inside the block (all ranks must enter); no-op without FSDP.

    Enough for the prompt K/V (text embedding and cross-attention live in the root unit)."""
    if not _is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_state_dict(model) -> dict:
    """CPU state dict of the whole network (collective under FSDP: rank 0 gets it, other ranks {})."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def param_digest(model) -> str:
    """sha256 of all parameters (bytes, name order): equal digests = bit-identical networks (collective with FSDP)."""
    h = hashlib.sha256()
    for n, p in sorted(full_state_dict(model).items()):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- logging ---------------------------------------------------------------------------------------------

class MetricsLogger:
    """jsonl + console on the main process, wandb (offline by default) when enabled."""

    def __init__(self, cfg, out: Path, main: bool):
        self.main, self.out, self.wandb = main, out, None
        tc = cfg.train
        if main and tc.wandb:
            try:
                import wandb
            except ImportError:
                raise AvatarForcingError("train.wandb=true needs the wandb package (pip install wandb) "
                                         "or set train.wandb=false") from None
            os.environ.setdefault("WANDB_MODE", str(tc.wandb_mode))
            id_file = out / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            self.wandb = wandb.init(project=str(tc.wandb_project), dir=str(out), mode=str(tc.wandb_mode),
                                    config=OmegaConf.to_container(cfg, resolve=True), id=run_id, resume="allow",
                                    name=tc.wandb_name or None)
            id_file.write_text(self.wandb.id)

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def video(self, step: int, key: str, frames: np.ndarray, fps: int) -> None:
        if self.main and self.wandb is not None:
            import wandb
            self.wandb.log({key: wandb.Video(frames.transpose(0, 3, 1, 2), fps=fps, format="mp4")}, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


# ---- the trainer -----------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg, stage: str):
        from accelerate import Accelerator
        tc = cfg.train
        mp = str(tc.mixed_precision)
        if mp not in ("no", "bf16"):
            raise AvatarForcingError(f"train.mixed_precision '{mp}' is not supported; use 'no' or 'bf16'")
        dev = str(tc.device)
        cpu = dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())
        if cpu and mp == "bf16" and dev == "auto":
            mp = "no"  # bf16 autocast on CPU is slow and not what the paper configs mean
        self.acc = Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=1)
        self.cfg, self.stage_name = cfg, stage
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.device = self.acc.device
        self.fsdp = bool(tc.fsdp) and self.world > 1      # one process: nothing to shard
        self.out = Path(tc.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.out.mkdir(parents=True, exist_ok=True)
        self.roles: dict[str, Role] = {}
        self.frozen: dict[str, torch.nn.Module] = {}
        self.step = 0
        self.seed = int(cfg.seed)
        random.seed(self.seed + self.rank)
        np.random.seed((self.seed + self.rank) % 2 ** 32)
        torch.manual_seed(self.seed + self.rank)
        self.logger = MetricsLogger(cfg, self.out, self.main)
        if self.main:
            (self.out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self._trace = None
        if tc.trace:
            self._trace = open(self.out / f"trace_rank{self.rank}.jsonl", "a")

    # -- randomness ----------------------------------------------------------------------------------------
    def generator(self, step: int, micro: int = 0, salt: int = 0, per_rank: bool = True) -> torch.Generator:
        """CPU generator keyed by (seed, step, micro-step, salt[, rank]): independent of history, so resume is exact."""
        g = torch.Generator()
        g.manual_seed(stable_seed(self.seed, step, micro, salt, self.rank if per_rank else "all"))
        return g

    def autocast(self):
        return self.acc.autocast()

    # -- networks -----------------------------------------------------------------------------------------
    def _place(self, model, trainable: bool):
        model.to(self.device)
        if not trainable:
            model.requires_grad_(False).eval()
            if self.acc.mixed_precision == "bf16":
                model.to(torch.bfloat16)   # frozen teacher: bf16 weights
        if self.world > 1 and not self.fsdp:
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t.data, 0)
        if self.fsdp:
            model = _fsdp_wrap(model)
        return model

    def add_frozen(self, name: str, model) -> torch.nn.Module:
        model = self._place(model, trainable=False)
        self.frozen[name] = model
        return model

    def add_role(self, name: str, model, lr: float, *, ema: bool = False, betas=None, weight_decay=None,
                 grad_clip=None) -> Role:
        tc = self.cfg.train
        module = model
        model = self._place(model, trainable=True)
        params = [p for p in model.parameters() if p.requires_grad]
        betas = tuple(float(b) for b in (betas if betas is not None else tc.betas))
        opt = torch.optim.AdamW(params, lr=float(lr), betas=betas, eps=float(tc.adam_eps),
                                weight_decay=float(tc.weight_decay if weight_decay is None else weight_decay))
        warm = int(tc.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        e = EMA(model.named_parameters(), tc.ema_decay, tc.ema_start) if ema and tc.ema_decay is not None else None
        role = Role(name, model, module, opt, sched, e,
                    float(tc.grad_clip if grad_clip is None else grad_clip), has_ema=bool(ema and tc.ema_decay is not None),
                    params=params)
        self.roles[name] = role
        return role

    # -- optimisation -------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _allreduce_grads(self, role: Role, bucket_elems: int = 1 << 24) -> None:
        params = role.params
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
            flat = torch.cat([p.grad.reshape(-1).float() for p in chunk])
            dist.all_reduce(flat)
            flat /= self.world
            off = 0
            for p in chunk:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
                off += p.numel()

    def optimizer_step(self, role: Role, step: int) -> dict:
        """Average gradients over processes, clip, AdamW step, zero grads, EMA.  Returns grad norm and lr."""
        if self.world > 1 and not self.fsdp:
            self._allreduce_grads(role)
        norm = _local(torch.nn.utils.clip_grad_norm_(role.params, role.grad_clip if role.grad_clip > 0 else float("inf")))
        lr = role.scheduler.get_last_lr()[0]
        role.optimizer.step()
        role.scheduler.step()
        role.optimizer.zero_grad(set_to_none=True)
        if role.ema is not None:
            role.ema.update(role.model.named_parameters(), step)
        return {f"{role.name}/grad_norm": float(norm), f"{role.name}/lr": lr}

    def trace(self, record: dict) -> None:
        if self._trace is not None:
            self._trace.write(json.dumps(record) + "\n")
            self._trace.flush()

    def reduce_mean(self, metrics: dict) -> dict:
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        t /= self.world
        return {**metrics, **{k: float(v) for k, v in zip(keys, t.tolist())}}

    # -- checkpoints --------------------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def _set_rng_state(self, st: dict) -> None:
        random.setstate(st["python"])
        np.random.set_state(st["numpy"])
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])

    def _optim_state(self, role: Role) -> dict:
        if _is_fsdp(role.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            return get_optimizer_state_dict(role.model, role.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return role.optimizer.state_dict()

    def _barrier(self):
        if self.world > 1:
            self.acc.wait_for_everyone()

    def save(self, stage) -> Path:
        name = f"step_{self.step:08d}"
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".{name}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save({"rng": self._rng_state(), "rank": self.rank, "world": self.world}, tmp / f"rank_{self.rank}.pt")
        models = {n: full_state_dict(r.model) for n, r in self.roles.items()}     # collective under FSDP
        optims = {n: self._optim_state(r) for n, r in self.roles.items()}
        emas = {n: r.ema.state_dict() for n, r in self.roles.items() if r.ema is not None}
        if self.main:
            state = {
                "format": CKPT_FORMAT, "stage": self.stage_name, "step": self.step, "world": self.world,
                "fsdp": self.fsdp,
                "models": models, "optimizers": optims,
                "schedulers": {n: r.scheduler.state_dict() for n, r in self.roles.items()},
                "ema": emas,
                "data": {k: s.state_dict() for k, s in stage.data_states().items()},
                "config": OmegaConf.to_yaml(self.cfg),
            }
            extra = getattr(stage, "state_dict", None)
            if extra is not None:
                state["stage_state"] = extra()
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": self.step, "stage": self.stage_name,
                                                       "world": self.world, "time": time.time()}))
            _fsync_dir(tmp)
            old = None
            if final.exists():
                old = self.ckpt_dir / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)                       # the commit
            _atomic_write(self.ckpt_dir / "latest", name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune()
        self._barrier()
        return final

    def _prune(self):
        keep = int(self.cfg.train.keep_checkpoints)
        if keep <= 0:
            return
        done = complete_checkpoints(self.ckpt_dir)
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def find_resume(self) -> Path | None:
        r = self.cfg.train.resume
        if r in (None, False) or str(r).lower() in ("none", "false", "never", "no"):
            return None
        if str(r) == "auto":
            done = complete_checkpoints(self.ckpt_dir)
            return done[-1] if done else None
        p = Path(str(r))
        if not (p / "state.pt").is_file():
            raise AvatarForcingError(f"train.resume={r}: no checkpoint there (expected {p / 'state.pt'}); pass a "
                                     f"checkpoints/step_XXXXXXXX folder, 'auto' or null")
        return p

    def load(self, path: Path, stage) -> None:
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except Exception as exc:
            raise AvatarForcingError(f"cannot read checkpoint {path / 'state.pt'} ({type(exc).__name__}); delete the "
                                     "folder to fall back to the previous one") from None
        if state.get("format") != CKPT_FORMAT or state.get("stage") != self.stage_name:
            raise AvatarForcingError(f"{path} is a '{state.get('stage')}' checkpoint, not '{self.stage_name}'; use "
                                     "another train.output_dir or train.resume=null")
        if bool(state.get("fsdp", False)) != self.fsdp:
            raise AvatarForcingError(f"{path} was written with train.fsdp={state.get('fsdp')}; resume it with the same "
                                     "setting (optimizer states are laid out differently)")
        for n, r in self.roles.items():
            self._load_model(r.model, state["models"][n])
            if _is_fsdp(r.model):
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                # strict=False: parameters that never received a gradient (DMD's text path under FSDP) have no state
                set_optimizer_state_dict(r.model, r.optimizer, state["optimizers"][n],
                                         options=StateDictOptions(full_state_dict=True, strict=False))
            else:
                r.optimizer.load_state_dict(state["optimizers"][n])
            r.scheduler.load_state_dict(state["schedulers"][n])
            if r.ema is not None and n in state.get("ema", {}):
                r.ema.load_state_dict(state["ema"][n])
        for k, s in stage.data_states().items():
            s.load_state_dict(state["data"][k])
        if "stage_state" in state and hasattr(stage, "load_state_dict"):
            stage.load_state_dict(state["stage_state"])
        self.step = int(state["step"])
        rank_file = path / f"rank_{self.rank}.pt"
        if rank_file.is_file() and int(state.get("world", 1)) == self.world:
            self._set_rng_state(torch.load(rank_file, map_location="cpu", weights_only=False)["rng"])
        else:
            log.warning("%s: saved with %s processes, resuming with %s: RNG states are re-seeded (the training "
                        "randomness itself is keyed by step and stays reproducible)", path, state.get("world"), self.world)
        if self.main:
            log.info("resumed from %s at step %d", path, self.step)

    def _load_model(self, model, sd: dict) -> None:
        if _is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(sd)

    # -- export -------------------------------------------------------------------------------------------
    def export(self, role: Role, path: Path | None = None) -> Path | None:
        """The released layout {'generator', 'generator_ema'} that inference.py / load_dit reads."""
        from ..checkpoint import export_released
        path = Path(path or self.out / "export" / "model.pt")
        sd = full_state_dict(role.model)
        ema = role.ema.state_dict() if role.ema is not None else None      # collective under FSDP
        if self.main:
            tmp = path.with_name(f".{path.name}.tmp")
            export_released(sd, tmp, ema)
            os.replace(tmp, path)
        self._barrier()
        return path if self.main else None

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, stage) -> dict:
        tc = self.cfg.train
        resume = self.find_resume()
        if resume is not None:
            self.load(resume, stage)
        total = int(tc.steps)
        stop_after = int(tc.stop_after) if tc.stop_after is not None else None
        start = self.step
        last: dict = {}
        bar = None
        if self.main and tc.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=start, desc=self.stage_name, dynamic_ncols=True, file=sys.stderr)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while self.step < total:
            step = self.step + 1
            t0 = time.perf_counter()
            metrics = stage.train_step(step)
            self.step = step
            metrics = self.reduce_mean(metrics)
            metrics["time/step_s"] = time.perf_counter() - t0
            if self.device.type == "cuda":
                metrics["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            for k, s in stage.data_states().items():
                metrics[f"{k}/skipped"] = s.ds.skipped
            last = metrics
            if step % max(1, int(tc.log_every)) == 0 or step == total:
                self.logger.log(step, metrics)
                if bar is None and self.main:
                    print(f"[{self.stage_name}] step {step}/{total} " +
                          " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if "loss" in k})
            if tc.sample_every and step % int(tc.sample_every) == 0 and hasattr(stage, "sample_video"):
                self._log_samples(stage, step)
            saved = False
            if (tc.save_every and step % int(tc.save_every) == 0) or step == total:
                self.save(stage)
                saved = True
            if stop_after is not None and step - start >= stop_after:
                if not saved:
                    self.save(stage)
                break
        if bar is not None:
            bar.close()
        if self.step >= total and tc.export:
            self.export(stage.export_role())
        self.logger.close()
        return last

    def _log_samples(self, stage, step: int) -> None:
        if self.logger.wandb is None:
            return
        latents = stage.sample_video()
        if latents is None:
            return
        try:
            from ..vae import build_vae
            if not hasattr(self, "_vae"):
                with torch.random.fork_rng():   # a random init (no vae.path) follows cfg.seed, as in preprocessing
                    torch.manual_seed(int(self.cfg.seed))
                    self._vae = build_vae(self.cfg.vae).to(self.device)
            with torch.no_grad():
                video = self._vae.decode(latents[:1].to(self.device))          # [1, 3, T, H, W] in [-1, 1]
            frames = ((video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).byte().cpu().numpy()
            self.logger.video(step, f"{self.stage_name}/sample", frames, int(self.cfg.inference.fps))
        except Exception as exc:  # sample videos are a convenience, never fatal
            log.warning("sample video at step %d failed: %s", step, exc)

    def close(self):
        if self._trace is not None:
            self._trace.close()
        if self.world > 1 and dist.is_initialized():
            self._barrier()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoint folders (renamed from their temp name), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


# ---- entry points ---------------------------------------------------------------------------------------

def parse_args(argv, description: str):
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="experiment YAML merged over configs/default.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def run_stage(stage_cls, cfg) -> dict:
    """Build the trainer and the stage from a config, train, export.  Returns the last metrics."""
    trainer = Trainer(cfg, stage_cls.name)
    try:
        stage = stage_cls(cfg, trainer)
        trainer.stage = stage
        return trainer.run(stage)
    finally:
        trainer.close()


def main(stage_cls, argv=None, description: str = "") -> int:
    from ..config import load_config
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv, description)
    try:
        cfg = load_config(args.config, args.overrides)
        run_stage(stage_cls, cfg)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
