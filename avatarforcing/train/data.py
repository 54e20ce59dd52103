"""The training-sample format (the one place that reads and writes it) and the streaming datasets.

On-disk format ``avatarforcing-sample-v1``: one safetensors file per sample in a flat directory; the
sorted directory listing is the index (so several preprocessing processes can write one directory
without coordination, and a resumed run skips what exists).  Files are written to ``.<name>.tmp`` and
renamed, so a killed writer never leaves a half file under a sample name.

``<dir>/<sample_id>.safetensors`` tensors (latent layout [C, F, h, w], F = 1 + k latent frames for a
clip of 1 + 4k video frames; latent frame 0 is the clip's first video frame):

=============  ====================  ========================================================
field          shape                 meaning
=============  ====================  ========================================================
latents        [16, F, h, w]         VAE latents of the clip                   (kind ``clip``)
ref            [16, 1, h, w]         reference-frame latent (style anchor, i2v channels)
audio          [F, A]                per-latent-frame audio (``audio.latent_audio``); row 0 = 0
text           [Lt, text_dim]        prompt embeddings of the real tokens (zero rows dropped,
                                     zero-padded to ``model.text_len`` when read)
trajectory     [S, 16, F, h, w]      teacher ODE states at the student timesteps (``ode``)
timesteps      [S] float64           those timesteps, noisiest first   (== WindowSchedule.timesteps)
clean          [16, F, h, w]         the teacher's clean endpoint (t = 0); frame 0 = ref
=============  ====================  ========================================================

metadata (str -> str): ``format``, ``kind`` (clip | ode), ``caption``, ``source``, plus free keys.

``<dir>/null_text.safetensors`` holds ``empty`` (the empty prompt, teacher condition dropout) and
``negative`` (``teacher.negative_prompt``, the CFG unconditional branch).

Bad samples (unreadable file, missing field, wrong shape) raise :class:`BadSample` naming the file;
the datasets either skip them (counted, logged once per file) or fail (``data.on_error: skip | fail``).
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import AvatarForcingError

log = logging.getLogger(__name__)

FORMAT = "avatarforcing-sample-v1"
SUFFIX = ".safetensors"
NULL_TEXT = "null_text" + SUFFIX

CLIP_FIELDS = ("latents", "ref", "audio", "text")
ODE_FIELDS = ("trajectory", "timesteps", "clean", "ref", "audio", "text")
COND_FIELDS = ("ref", "audio", "text")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class BadSample(AvatarForcingError):
    """A sample file that cannot be used; the message starts with the file name."""


def storage_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise AvatarForcingError(f"data.dtype '{name}' is not known; use float32, bfloat16 or float16") from None


def sample_path(directory, sample_id: str) -> Path:
    return Path(directory) / f"{sample_id}{SUFFIX}"


def trim_text(text: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-zero rows (padding) of [L, D] prompt embeddings; keeps at least one row."""
    nz = (text != 0).any(dim=-1).nonzero()
    n = int(nz.max()) + 1 if len(nz) else 1
    return text[:n]


def pad_text(text: torch.Tensor, length: int) -> torch.Tensor:
    """[..., Lt, D] -> [..., length, D]: truncate or zero-pad."""
    text = text[..., :length, :]
    return F.pad(text, (0, 0, 0, length - text.shape[-2]))


def write_sample(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, kind: str = "clip",
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write one sample atomically.  Floating tensors are stored in ``dtype`` except ``timesteps`` (float64)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.float64 if k == "timesteps" else dtype)
        out[k] = v.contiguous().clone()  # own storage: safetensors refuses shared tensors
    meta = {"format": FORMAT, "kind": kind}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(out, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_sample(path, fields: Sequence[str] | None = None, *, with_metadata: bool = False):
    """Read the requested fields (all when None) of one sample; raises :class:`BadSample`."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            want = list(keys) if fields is None else list(fields)
            missing = [k for k in want if k not in keys]
            if missing:
                raise BadSample(f"{path}: missing field(s) {missing} (has {sorted(keys)}); re-run the step that "
                                "wrote it (scripts/preprocess.py or scripts/ode_backfill.py)")
            out = {k: f.get_tensor(k) for k in want}
    except BadSample:
        raise
    except Exception as exc:  # SafetensorError, OSError, JSON errors: a truncated or corrupt file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadSample(f"{path}: cannot read sample ({type(exc).__name__}: {reason}); delete it and re-run "
                        "the step that wrote it") from None
    if meta.get("format") != FORMAT:
        raise BadSample(f"{path}: not an {FORMAT} file (format={meta.get('format')!r})")
    return (out, meta) if with_metadata else out


def list_samples(directory) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise AvatarForcingError(f"sample directory not found: {directory}; run scripts/preprocess.py (data.shards) "
                                 "or scripts/ode_backfill.py (data.ode) first")
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.name != NULL_TEXT and not p.name.startswith("."))


def write_null_text(directory, empty: torch.Tensor, negative: torch.Tensor) -> Path:
    """The unconditional prompts ([L, D] each) of a sample directory."""
    from safetensors.torch import save_file
    path = Path(directory) / NULL_TEXT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"empty": trim_text(empty.detach().cpu().float()).contiguous(),
               "negative": trim_text(negative.detach().cpu().float()).contiguous()}, str(tmp),
              metadata={"format": FORMAT, "kind": "null_text"})
    os.replace(tmp, path)
    return path


def read_null_text(directory, text_len: int, text_dim: int, allow_zeros: bool = False) -> dict[str, torch.Tensor]:
    """{'empty', 'negative'} -> [text_len, text_dim]; zeros when missing and ``allow_zeros`` (text.encoder=none)."""
    path = Path(directory) / NULL_TEXT
    if not path.is_file():
        if allow_zeros:
            z = torch.zeros(text_len, text_dim)
            return {"empty": z, "negative": z.clone()}
        raise AvatarForcingError(f"{path} not found: the unconditional prompts are written by scripts/preprocess.py; "
                                 "re-run it on this directory (it skips done samples)")
    out = read_sample(path, ("empty", "negative"))
    for k, v in out.items():
        if v.shape[-1] != text_dim:
            raise AvatarForcingError(f"{path}: '{k}' has text_dim {v.shape[-1]} but model.text_dim is {text_dim}")
        out[k] = pad_text(v.float(), text_len)
    return out


# ---- datasets ----------------------------------------------------------------------------------------

class ShardDataset:
    """Map-style view of a sample directory: files are read lazily, only the requested fields.

    ``check(path, sample)`` may raise :class:`BadSample` for content errors (shapes, timesteps)."""

    def __init__(self, directory, fields: Sequence[str], text_len: int, *, check=None, on_error: str = "skip"):
        if on_error not in ("skip", "fail"):
            raise AvatarForcingError(f"data.on_error must be 'skip' or 'fail', got {on_error!r}")
        self.directory = Path(directory)
        self.files = list_samples(directory)
        if not self.files:
            raise AvatarForcingError(f"no samples in {directory}; run scripts/preprocess.py / scripts/ode_backfill.py")
        self.fields, self.text_len, self.check, self.on_error = tuple(fields), int(text_len), check, on_error
        self.skipped = 0               # skip events (a bad file met again counts again)
        self.bad: dict[str, str] = {}  # file -> reason (logged once)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> dict:
        path = self.files[index]
        sample = read_sample(path, self.fields)
        for k in ("ref", "latents", "clean", "trajectory", "audio"):
            if k in sample:
                sample[k] = sample[k].float()
        if "text" in sample:
            if sample["text"].dim() != 2:
                raise BadSample(f"{path}: 'text' must be [L, D], got {list(sample['text'].shape)}")
            sample["text"] = pad_text(sample["text"].float(), self.text_len)
        if self.check is not None:
            self.check(path, sample)
        sample["index"] = index
        return sample

    def get(self, index: int) -> dict:
        """Sample ``index``, or with on_error=skip the next good one (wrapping); raises when all are bad."""
        n = len(self.files)
        for j in range(n):
            i = (index + j) % n
            if self.files[i].name in self.bad:
                self._count_skip()
                continue
            try:
                return self.load(i)
            except BadSample as exc:
                if self.on_error == "fail":
                    raise AvatarForcingError(f"{exc} (data.on_error=fail; set data.on_error=skip to skip bad samples)") from None
                with self._lock:
                    self.bad[self.files[i].name] = str(exc)
                log.warning("skipping bad sample %s", exc)
                self._count_skip()
        raise AvatarForcingError(f"every sample in {self.directory} is bad ({len(self.bad)} files), e.g. "
                                 f"{next(iter(self.bad.values()))}")

    def _count_skip(self):
        with self._lock:
            self.skipped += 1


def collate(samples: list[dict]) -> dict:
    out = {}
    for k in samples[0]:
        if k == "index":
            out[k] = torch.tensor([s[k] for s in samples])
            continue
        shapes = {tuple(s[k].shape) for s in samples}
        if len(shapes) > 1:
            files = ", ".join(str(s["index"]) for s in samples)
            raise AvatarForcingError(f"samples {files} have different '{k}' shapes {sorted(shapes)}; a batch needs "
                                     "equal clip sizes (preprocess with one data.clip_blocks / resolution) or batch_size=1")
        out[k] = torch.stack([s[k] for s in samples])
    return out


class BatchStream:
    """Deterministic, resumable stream of batches for one process.

    Epoch e is a permutation of the files seeded by (seed, e); each micro-step consumes ``world * batch``
    files of it and rank r takes its slice.  The position (micro-steps consumed) is the whole state, so a
    resumed run reads exactly the batches an uninterrupted one would.  ``prefetch`` > 0 loads the next
    batches in background threads (order unchanged)."""

    def __init__(self, dataset: ShardDataset, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 prefetch: int = 0):
        self.ds, self.batch, self.rank, self.world, self.seed = dataset, int(batch_size), rank, world, int(seed)
        per_step = self.batch * world
        if len(dataset) < per_step:
            raise AvatarForcingError(f"{dataset.directory} holds {len(dataset)} samples, fewer than batch_size x processes "
                                     f"= {self.batch} x {world}; lower train.batch_size or add data")
        self.steps_per_epoch = len(dataset) // per_step
        self.position = 0
        self.prefetch = int(prefetch)
        self._pool = ThreadPoolExecutor(max(1, self.prefetch)) if self.prefetch > 0 else None
        self._pending: dict[int, object] = {}

    def indices(self, position: int) -> list[int]:
        epoch, k = divmod(position, self.steps_per_epoch)
        perm = list(range(len(self.ds)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        start = k * self.batch * self.world + self.rank * self.batch
        return perm[start:start + self.batch]

    def _load(self, position: int) -> dict:
        return collate([self.ds.get(i) for i in self.indices(position)])

    def next(self) -> dict:
        pos = self.position
        fut = self._pending.pop(pos, None)
        batch = fut.result() if fut is not None else self._load(pos)
        self.position += 1
        if self._pool is not None:
            for p in range(self.position, self.position + self.prefetch):
                if p not in self._pending:
                    self._pending[p] = self._pool.submit(self._load, p)
        batch["epoch"] = pos // self.steps_per_epoch
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "skipped": self.ds.skipped, "bad": dict(self.ds.bad)}

    def load_state_dict(self, state: dict) -> None:
        self._pending.clear()
        self.position = int(state["position"])
        self.ds.skipped = int(state.get("skipped", 0))
        self.ds.bad.update(state.get("bad", {}))


def shard_work(items: Sequence, rank: int, world: int) -> list:
    """Round-robin split of a work list over processes."""
    return [x for i, x in enumerate(items) if i % world == rank]


def dist_rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """--rank/--world if given, else the launcher's RANK / WORLD_SIZE (torchrun, accelerate launch), else 0/1."""
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world is None else int(world)
    if not 0 <= r < w:
        raise AvatarForcingError(f"--rank {r} must be in [0, --world {w})")
    return r, w


def run_sharded_job(args, job) -> int:
    """The body of a sharded data job's script: ``job(cfg, rank, world)`` on the config and the process of the parsed
    :func:`sharded_job_parser` ``args``; prints its stats as JSON (exit 0), or an AvatarForcingError as one line
    (exit 1)."""
    import sys
    from ..config import load_config
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        rank, world = dist_rank_world(args.rank, args.world)
        stats = job(cfg, rank, world)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


def sharded_job_parser(description: str):
    """Command line of the sharded data jobs (preprocess, ODE backfill): --config, --rank/--world, key=value."""
    import argparse
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="experiment YAML merged over configs/default.yaml")
    ap.add_argument("--rank", type=int, default=None, help="this process (default: $RANK or 0)")
    ap.add_argument("--world", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap
