"""Generate a talking-avatar video from a reference image and speech audio.

    python inference.py --image face.png --audio speech.wav [--prompt "..."] [--config configs/x.yaml]
                        [--checkpoint model.pt] [--output out.mp4] [--seed N] [--duration S] [key=value ...]

prints the written mp4's path as the last line of stdout.  The reference release's command works unchanged:

    python inference.py --config_path configs/avatarforcing.yaml --output_folder outputs \\
        --checkpoint_path checkpoints/model.pt --data_path list.txt --num_output_frames 225 --i2v

(list.txt: one ``image audio "caption"`` per line, paths relative to the list's folder; one mp4 per line;
``--num_output_frames`` counts latent frames including the reference, (n - 1) a multiple of B).
The default config is configs/demo.yaml if present, else configs/tiny.yaml (a tiny random model).
Errors print ``error: <message>`` on stderr and exit with status 1; no partial video is left behind.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from avatarforcing import AvatarForcingError, run_command
from avatarforcing.config import load_config, resolve_path, resource_path
from avatarforcing.pipeline import AvatarPipeline, default_config_path

log = logging.getLogger("avatarforcing.inference")
EXAMPLE_IMAGE = resource_path("assets/example.png", required=False)   # the checkout's, else the installed copy
EXAMPLE_AUDIO = resource_path("assets/example.wav", required=False)


# ---- the reference release's data list, lengths, output checks ------------------------------------------

@dataclass(frozen=True)
class DataItem:
    """One line of a reference-release data list: ``image audio "caption"``."""

    image: Path
    audio: Path
    prompt: str = ""


def read_data_list(path: str | os.PathLike) -> list[DataItem]:
    """Parse a data list; relative paths are resolved against the list file's folder."""
    path = Path(path)
    if not path.is_file():
        raise AvatarForcingError(f"data list not found: {path}; pass a text file with one 'image audio \"caption\"' per line")
    items = []
    for num, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            parts = shlex.split(line)
        except ValueError as exc:
            raise AvatarForcingError(f"{path}:{num}: cannot parse line ({exc}); use: image audio \"caption\"") from None
        if len(parts) < 2:
            raise AvatarForcingError(f"{path}:{num}: expected 'image audio \"caption\"', got {line.strip()!r}")
        image, audio = (Path(p) if Path(p).is_absolute() else path.parent / p for p in parts[:2])
        for kind, p in (("image", image), ("audio", audio)):
            if not p.is_file():
                raise AvatarForcingError(f"{path}:{num}: {kind} file not found: {p}")
        items.append(DataItem(image, audio, " ".join(parts[2:])))
    if not items:
        raise AvatarForcingError(f"data list {path} has no entries; add lines 'image audio \"caption\"'")
    return items


def blocks_for_latent_frames(num_latent_frames: int, block_frames: int) -> int:
    """Reference ``--num_output_frames`` (latent frames incl. the reference) -> blocks, rounding up with a note."""
    n = max(1, math.ceil((num_latent_frames - 1) / block_frames))
    if num_latent_frames - 1 != n * block_frames:
        log.info("note: --num_output_frames %d: (n - 1) must be a multiple of B = %d; using %d latent frames "
                 "(%d blocks)", num_latent_frames, block_frames, 1 + n * block_frames, n)
    return n


def check_writable(output: str | os.PathLike) -> None:
    """Fail before any generation if ``output``'s folder cannot be written."""
    folder = Path(output).parent
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise AvatarForcingError(f"cannot write to output folder {folder}: {blocker} is a file; choose another output path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise AvatarForcingError(f"cannot write to output folder {folder} ({exc.strerror}); "
                                 "choose a writable output path") from None


# ---- the command line -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line error and exit 1, like every other failure
        raise AvatarForcingError(f"{message} (see python inference.py --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="AvatarForcing: reference image + speech -> talking-avatar video (mp4).",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--image", help="reference image (default: assets/example.png)")
    p.add_argument("--audio", help="speech audio, wav/mp3/flac (default: assets/example.wav)")
    p.add_argument("--prompt", help="text prompt (default: inference.prompt)")
    p.add_argument("--config", help="experiment YAML (default: configs/demo.yaml, else configs/tiny.yaml)")
    p.add_argument("--checkpoint", help="DiT weights (default: inference.checkpoint; none = random init)")
    p.add_argument("--output", help="output mp4 or folder (default: inference.output)")
    p.add_argument("--seed", type=int, help="noise seed (default: seed)")
    p.add_argument("--duration", type=float, help="seconds of video, rounded up to whole blocks (default: the audio's length)")
    ref = p.add_argument_group("reference-release command")
    ref.add_argument("--config_path", help="same as --config")
    ref.add_argument("--checkpoint_path", help="same as --checkpoint")
    ref.add_argument("--output_folder", help="folder for one mp4 per data-list line (default: outputs)")
    ref.add_argument("--data_path", help="data list: one 'image audio \"caption\"' per line")
    ref.add_argument("--num_output_frames", type=int, help="latent frames incl. the reference (default: the audio's length)")
    ref.add_argument("--i2v", action="store_true", help="image-to-video (the only mode; required with --data_path)")
    ref.add_argument("--use_ema", action="store_true", help="load the checkpoint's EMA weights")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. schedule.window_blocks=2")
    return p


def _find(path: str | None, fallback: Path | None = None) -> Path | None:
    """A path as given, else a shipped file of that name (configs/..., see config.resolve_path), else ``fallback``."""
    if path is None:
        return fallback
    return resolve_path(path)


def run(args) -> list[Path]:
    release = args.data_path is not None
    if release and (args.image or args.audio):
        raise AvatarForcingError("--data_path and --image/--audio exclude each other; use one of the two forms")
    overrides = list(args.overrides) + (["inference.use_ema=true"] if args.use_ema else [])
    if args.seed is not None:            # --seed: the noise and the random initialisations (no checkpoint)
        overrides.append(f"seed={args.seed}")
    cfg = load_config(_find(args.config or args.config_path, default_config_path()), overrides)
    checkpoint = args.checkpoint or args.checkpoint_path or cfg.inference.checkpoint
    seed = cfg.seed if args.seed is None else args.seed
    duration = cfg.inference.duration if args.duration is None else args.duration
    progress = sys.stderr.isatty()

    if release:
        if not args.i2v:
            raise AvatarForcingError("the reference command generates from a reference image only: add --i2v")
        items = read_data_list(args.data_path)
        folder = Path(args.output_folder or "outputs")
        check_writable(folder / "probe.mp4")
        num_blocks = None
        if args.num_output_frames is not None:
            num_blocks = blocks_for_latent_frames(args.num_output_frames, int(cfg.schedule.block_frames))
        pipe = AvatarPipeline.from_config(cfg, checkpoint)
        # Fail before generating anything; batch only items whose videos have the same size (keep_aspect).
        by_size: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            by_size.setdefault(tuple(pipe.load_images([item.image]).shape[-2:]), []).append(index)
        size = max(1, int(cfg.inference.batch_size))
        batches = [group[i:i + size] for group in by_size.values() for i in range(0, len(group), size)]
        written = {}
        for batch in batches:
            outputs = [folder / f"{i:04d}_{items[i].image.stem}.mp4" for i in batch]
            paths = pipe.generate([items[i].image for i in batch], [items[i].audio for i in batch], outputs,
                                  [items[i].prompt for i in batch], [seed + i for i in batch],
                                  duration=duration, progress=progress, num_blocks=num_blocks)
            for i, path in zip(batch, paths):
                print(path, flush=True)
                written[i] = path
        return [written[i] for i in sorted(written)]

    from avatarforcing.media import check_audio, load_image

    image = _find(args.image, EXAMPLE_IMAGE if EXAMPLE_IMAGE.is_file() else None)
    audio = _find(args.audio, EXAMPLE_AUDIO if EXAMPLE_AUDIO.is_file() else None)
    if image is None or audio is None:
        missing = "--image" if image is None else "--audio"
        raise AvatarForcingError(f"no {missing} given and the example assets/example.{'png' if image is None else 'wav'} "
                                 f"is missing; pass {missing} <file>")
    output = Path(args.output or cfg.inference.output)
    if output.is_dir() or str(args.output or "").endswith(("/", "\\")):
        output = output / f"{image.stem}.mp4"
    # Check the inputs and the output folder before building the model.
    load_image(image, int(cfg.inference.height), int(cfg.inference.width), str(cfg.inference.resize))
    check_audio(audio)
    check_writable(output)
    pipe = AvatarPipeline.from_config(cfg, checkpoint)
    prompt = cfg.inference.prompt if args.prompt is None else args.prompt
    path = pipe.generate(image, audio, output, prompt, seed, duration=duration, progress=progress)
    print(path, flush=True)
    return [path]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_command(lambda: run(build_parser().parse_intermixed_args(argv)),
                       interrupted="interrupted; no video was written for the unfinished clip")


if __name__ == "__main__":
    sys.exit(main())
