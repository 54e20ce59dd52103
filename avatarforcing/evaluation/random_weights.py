"""A weights folder of random weights in the real files' layouts: for tests, benchmarks and smoke runs.

Torch files carry exactly the keys and shapes the loaders read (``alexnet-owt-7be5be79.pth`` only its
``features.*``, the real file's classifier is never read; ``syncnet_v2.model`` in PyTorch's legacy format without
``num_batches_tracked``, as the 2017 file).  The ONNX and TorchScript files are stand-ins with the real interface:

* ``buffalo_l/w600k_r50.onnx``: an iResNet (insightface's arcface_torch ``iresnet50`` blocks (3, 4, 14, 3); one
  block per stage with ``small``), input [N, 3, 112, 112], output [N, 512];
* ``buffalo_l/det_10g.onnx``: a plain strided CNN (not SCRFD's backbone; about 10 GFLOPs at 640 x 640 like
  SCRFD-10G, a few hundred MFLOPs with ``small``) with SCRFD's nine outputs (scores, box distances, landmark
  offsets for strides 8 / 16 / 32, two anchors), any input size;
* ``i3d_torchscript.pt``: the Inception-I3D architecture (Kinetics-400 logits; a one-conv net with ``small``),
  scripted with StyleGAN-V's ``forward(x, rescale, resize, return_features)``.
None of them computes anything meaningful: metric values on random weights only exercise the code.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .faces import S3FDNet
from .inception import FIDInceptionV3
from .lpips import AlexNetTrunk, LPIPSHead
from .syncnet import SyncNet
from .weights import WEIGHT_FILES

# ----------------------------------------------------------------------------------------------
# stand-in architectures for the ONNX / TorchScript files


class IBasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.prelu = nn.PReLU(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface's iResNet (arcface_torch/backbones/iresnet.py): 112 x 112 -> 512."""

    def __init__(self, layers=(3, 4, 14, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        stages, c_in = [], 64
        for c_out, n in zip((64, 128, 256, 512), layers):
            stages.append(nn.Sequential(*(IBasicBlock(c_in if i == 0 else c_out, c_out, 2 if i == 0 else 1)
                                          for i in range(n))))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


class SCRFDStandIn(nn.Module):
    """Strided CNN with SCRFD's outputs: for strides 8, 16, 32 the scores [n, 1] (sigmoid), box distances [n, 4]
    and landmark offsets [n, 10] of two anchors per position (in units of the stride).  Score logits are
    shifted and scaled so that the anchors within 1/32 standard deviation of the best pass SCRFD's 0.5 threshold
    (every frame has a face)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        conv = lambda a, b: nn.Sequential(nn.Conv2d(a, b, 3, 2, 1), nn.ReLU(), nn.Conv2d(b, b, 3, 1, 1), nn.ReLU())  # noqa: E731
        self.stem = nn.Sequential(conv(3, w), conv(w, 2 * w), conv(2 * w, 4 * w))         # stride 8
        self.down16, self.down32 = conv(4 * w, 8 * w), conv(8 * w, 16 * w)
        chans = (4 * w, 8 * w, 16 * w)
        self.score = nn.ModuleList(nn.Conv2d(c, 2, 3, 1, 1) for c in chans)
        self.bbox = nn.ModuleList(nn.Conv2d(c, 8, 3, 1, 1) for c in chans)
        self.kps = nn.ModuleList(nn.Conv2d(c, 20, 3, 1, 1) for c in chans)

    def forward(self, x):
        f8 = self.stem(x)
        f16 = self.down16(f8)
        feats = (f8, f16, self.down32(f16))
        flat = lambda t, k: t.permute(0, 2, 3, 1).reshape(-1, k)            # noqa: E731
        logits = [h(f) for h, f in zip(self.score, feats)]
        logits = [32 * (z - z.amax()) / (z.std() + 1e-6) + 1.0 for z in logits]  # within std / 32 of the best
        scores = [flat(torch.sigmoid(z), 1) for z in logits]
        boxes = [flat(F.softplus(h(f)) + 1.0, 4) for h, f in zip(self.bbox, feats)]
        kps = [flat(h(f), 10) for h, f in zip(self.kps, feats)]
        return tuple(scores + boxes + kps)


class Unit3D(nn.Module):
    def __init__(self, c_in, c_out, kernel=1, stride=1, padding=0):
        super().__init__()
        self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv3d(x)))


class InceptionBlock3D(nn.Module):
    def __init__(self, c_in, c):
        super().__init__()
        self.b0 = Unit3D(c_in, c[0])
        self.b1 = nn.Sequential(Unit3D(c_in, c[1]), Unit3D(c[1], c[2], 3, padding=1))
        self.b2 = nn.Sequential(Unit3D(c_in, c[3]), Unit3D(c[3], c[4], 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), Unit3D(c_in, c[5]))

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], 1)


def _i3d_body() -> nn.Sequential:
    """Inception-I3D (Carreira & Zisserman 2017), symmetric padding for TensorFlow's SAME."""
    mixed = [(192, (64, 96, 128, 16, 32, 32)), (256, (128, 128, 192, 32, 96, 64)), None,
             (480, (192, 96, 208, 16, 48, 64)), (512, (160, 112, 224, 24, 64, 64)), (512, (128, 128, 256, 24, 64, 64)),
             (512, (112, 144, 288, 32, 64, 64)), (528, (256, 160, 320, 32, 128, 128)), "pool2",
             (832, (256, 160, 320, 32, 128, 128)), (832, (384, 192, 384, 48, 128, 128))]
    layers = [Unit3D(3, 64, 7, 2, 3), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)), Unit3D(64, 64),
              Unit3D(64, 192, 3, padding=1), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))]
    for m in mixed:
        layers.append(nn.MaxPool3d(3, 2, 1) if m is None else nn.MaxPool3d(2, 2) if m == "pool2"
                      else InceptionBlock3D(*m))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(1024, 400))


class I3DStandIn(nn.Module):
    """StyleGAN-V's detector interface: uint8 [B, 3, T, H, W] -> Kinetics-400 logits [B, 400]."""

    def __init__(self, small: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(3, 8, (3, 7, 7), (2, 8, 8)), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                                  nn.Flatten(), nn.Linear(8, 400)) if small else _i3d_body()

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        x = x.float()
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        logits = self.body(x)
        return logits if return_features else logits.softmax(-1)


# ----------------------------------------------------------------------------------------------
# the folder


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, dynamic: dict, outputs: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=["input.1"], output_names=outputs,
                          dynamic_axes={"input.1": dynamic}, opset_version=17, dynamo=False)


def write_random_weights(folder: os.PathLike | str, keys=None, small: bool = False, seed: int = 0) -> Path:
    """Write random-weight files for ``keys`` (default: all of :data:`WEIGHT_FILES`) into ``folder``.

    ``small`` makes the stand-ins (iResNet, I3D) light for tests; the torch files are always full size."""
    folder = Path(folder)
    torch.manual_seed(seed)
    for key in keys or WEIGHT_FILES:
        path = folder / WEIGHT_FILES[key].path
        path.parent.mkdir(parents=True, exist_ok=True)
        if key == "syncnet":
            state = {k: v for k, v in SyncNet().state_dict().items() if not k.endswith("num_batches_tracked")}
            torch.save(state, path, _use_new_zipfile_serialization=False)
        elif key in ("s3fd", "inception", "alexnet", "lpips_alex"):
            module = {"s3fd": S3FDNet, "inception": FIDInceptionV3, "alexnet": AlexNetTrunk,
                      "lpips_alex": LPIPSHead}[key]()
            torch.save(module.state_dict(), path)
        elif key == "arcface":
            _export_onnx(IResNet((1, 1, 1, 1) if small else (3, 4, 14, 3)), torch.randn(1, 3, 112, 112), path,
                         {0: "batch"}, ["embedding"])
        elif key == "scrfd":
            names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
            _export_onnx(SCRFDStandIn(8 if small else 28), torch.randn(1, 3, 640, 640), path,
                         {2: "height", 3: "width"}, names)
        elif key == "i3d":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.script(I3DStandIn(small).eval()).save(str(path))
    return folder
