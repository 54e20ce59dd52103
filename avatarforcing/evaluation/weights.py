"""The evaluation weights folder: one layout, the download command of every file, one-line errors.

Every model of :mod:`avatarforcing.evaluation` loads from a local folder (``--weights DIR``); nothing is
downloaded at run time.  The layout (also in docs/evaluation.md)::

    DIR/syncnet_v2.model                          SyncNet (joonson/syncnet_python)            sync
    DIR/sfd_face.pth                              S3FD face detector (syncnet_python)         face crops
    DIR/buffalo_l/det_10g.onnx                    SCRFD detector + 5 landmarks (insightface)  csim
    DIR/buffalo_l/w600k_r50.onnx                  ArcFace iResNet-50 (insightface)            csim
    DIR/pt_inception-2015-12-05-6726825d.pth      FID Inception v3 (pytorch-fid)              fid
    DIR/i3d_torchscript.pt                        I3D Kinetics-400, TorchScript (StyleGAN-V)  fvd
    DIR/alexnet-owt-7be5be79.pth                  AlexNet trunk (torchvision)                 adj_lpips
    DIR/lpips_alex_v0.1.pth                       LPIPS linear layers (richzhang/lpips v0.1)  adj_lpips

A missing file, or one whose keys / shapes / interface are not those of the real file, is an
:class:`~avatarforcing.AvatarForcingError` of one line that names the file and the command that downloads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import AvatarForcingError


@dataclass(frozen=True)
class WeightFile:
    key: str            # name used in code
    path: str           # path inside the weights folder
    what: str           # model and where it comes from
    command: str        # shell command that downloads it into the folder; {dir} is the weights folder


BUFFALO_L = ("wget https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip -O /tmp/buffalo_l.zip"
             " && unzip -o /tmp/buffalo_l.zip -d {dir}/buffalo_l")       # det_10g.onnx and w600k_r50.onnx in one zip
WEIGHT_FILES: dict[str, WeightFile] = {w.key: w for w in (
    WeightFile("syncnet", "syncnet_v2.model", "SyncNet v2 (joonson/syncnet_python)",
               "wget http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model -O {dir}/syncnet_v2.model"),
    WeightFile("s3fd", "sfd_face.pth", "S3FD face detector (joonson/syncnet_python)",
               "wget https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/sfd_face.pth -O {dir}/sfd_face.pth"),
    WeightFile("scrfd", "buffalo_l/det_10g.onnx", "SCRFD-10G detector of insightface buffalo_l", BUFFALO_L),
    WeightFile("arcface", "buffalo_l/w600k_r50.onnx", "ArcFace iResNet-50 (WebFace600K) of insightface buffalo_l",
               BUFFALO_L),
    WeightFile("inception", "pt_inception-2015-12-05-6726825d.pth", "FID Inception v3 (mseitzer/pytorch-fid)",
               "wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth -O {dir}/pt_inception-2015-12-05-6726825d.pth"),
    WeightFile("i3d", "i3d_torchscript.pt", "I3D Kinetics-400 TorchScript of StyleGAN-V's FVD",
               "wget 'https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1' -O {dir}/i3d_torchscript.pt"),
    WeightFile("alexnet", "alexnet-owt-7be5be79.pth", "AlexNet ImageNet weights of torchvision (LPIPS trunk)",
               "wget https://download.pytorch.org/models/alexnet-owt-7be5be79.pth -O {dir}/alexnet-owt-7be5be79.pth"),
    WeightFile("lpips_alex", "lpips_alex_v0.1.pth", "LPIPS v0.1 linear layers for AlexNet (richzhang/PerceptualSimilarity)",
               "wget https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
               " -O {dir}/lpips_alex_v0.1.pth"),
)}

# metric -> weight files it needs (face crops add "s3fd" when crops come from the detector)
METRIC_WEIGHTS: dict[str, tuple[str, ...]] = {
    "sync": ("syncnet",), "csim": ("scrfd", "arcface"), "fid": ("inception",), "fvd": ("i3d",),
    "adj_lpips": ("alexnet", "lpips_alex"),
}


def download_hint(key: str, folder: os.PathLike | str) -> str:
    """``download: <command>`` for weight file ``key`` into ``folder``."""
    return "download: " + WEIGHT_FILES[key].command.format(dir=str(folder).rstrip("/") or ".")


def weight_error(key: str, folder: os.PathLike | str, problem: str) -> AvatarForcingError:
    """One line: the file, what is wrong with it, and the command that downloads the real one."""
    w = WEIGHT_FILES[key]
    return AvatarForcingError(f"{Path(folder) / w.path}: {problem} ({w.what}); {download_hint(key, folder)}")


class WeightsFolder:
    """A local folder laid out as in the module docstring."""

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise AvatarForcingError(f"weights folder {self.folder} does not exist; create it and download the files "
                                     "listed in docs/evaluation.md, or drop --weights to run only weight-free metrics")

    def path(self, key: str) -> Path:
        return self.folder / WEIGHT_FILES[key].path

    def check(self, keys) -> None:
        """Fail before any heavy work if a needed file is absent: one line per file, joined on one line."""
        missing = [k for k in dict.fromkeys(keys) if not self.path(k).is_file()]
        if missing:
            raise AvatarForcingError(" | ".join(str(weight_error(k, self.folder, "missing")) for k in missing))

    def error(self, key: str, problem: str) -> AvatarForcingError:
        return weight_error(key, self.folder, problem)

    def state_dict(self, key: str) -> dict[str, torch.Tensor]:
        """A torch weights file as a flat ``{name: tensor}`` (CPU; files saved on CUDA load too)."""
        path = self.path(key)
        if not path.is_file():
            raise self.error(key, "missing")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means: not the real file
            raise self.error(key, f"cannot be read as a torch weights file ({type(exc).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise self.error(key, "is not a state dict of tensors")
        return state

    def load_module(self, key: str, module: torch.nn.Module, only: str = "") -> torch.nn.Module:
        """Load ``module`` from the file's keys that start with ``only`` (e.g. ``features.``: the rest of the file
        is not used); every parameter and buffer of the module must be there at its shape (BatchNorm's
        ``num_batches_tracked`` may be absent, as in files saved by old PyTorch).  -> the module in eval mode."""
        state = {k: v for k, v in self.state_dict(key).items() if k.startswith(only)}
        own = module.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            parts = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                     f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                     f"shape mismatch {shapes[0]}" if shapes else ""]
            raise self.error(key, "does not match the architecture: " + ", ".join(p for p in parts if p))
        module.load_state_dict(state, strict=False)
        return module.eval()
