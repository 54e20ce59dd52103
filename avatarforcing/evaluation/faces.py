"""Face detection (S3FD) and the face crops every metric is computed on.

S3FD is the detector of joonson/syncnet_python (``detectors/s3fd``; weights ``sfd_face.pth``): a VGG16 trunk with
L2-normalised conv3_3 / conv4_3 / conv5_3, fc6/fc7 as convolutions, two extra stages, and a box / score head on
each of the six sources (anchors 16..512 px at strides 4..128; the first source max-outs three background
scores).  As there, a frame is scaled by ``scale`` (0.25), detections scoring over ``conf_th`` (0.9) are kept,
then non-maximum suppressed at IoU 0.3 and again at 0.1 (frames under 256 px on the short side are scaled to 64 px
there instead, about the smallest input the VGG trunk and its extra stages take).

Crops follow syncnet_python's ``run_pipeline.crop_video``: per frame the box's centre and half-size
``s = max(w, h) / 2``, each series median-filtered over 13 frames, and the window ``[y - s, y + 2.8 s) x
[x - 1.4 s, x + 1.4 s)`` (crop_scale 0.4; outside the frame filled with grey 110) resized to 224 x 224.
Simplifications, for one talking head per video: the highest-scoring face of each frame is the track (no
IoU tracker, no scene cuts), frames without a detection take the box interpolated from their neighbours, and a
video with no detection at all falls back to the centre crop (reported as ``face_detected = 0``).

Without a weights folder the crops are centre crops: the largest centred square, resized to 224 x 224.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import signal
from torch import nn

from .images import BatchedNet, batches, resize, to_nchw, to_uint8_nhwc
from .weights import WeightsFolder

CROP_SIZE = 224                     # syncnet_python writes 224 x 224 face tracks
S3FD_MEAN = (123.0, 117.0, 104.0)   # RGB mean subtracted before the net
MIN_SIZES = (16, 32, 64, 128, 256, 512)
STEPS = (4, 8, 16, 32, 64, 128)
VARIANCE = (0.1, 0.2)
MIN_DETECT_SIDE = 64                # short side of the detector's input at least (480 x 832 at 0.25: 120)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, offset: float = 0.0) -> np.ndarray:
    """Greedy non-maximum suppression -> kept indices, best first.  ``offset=1`` counts box sides as
    ``x2 - x1 + 1`` (insightface's convention); 0 as in syncnet_python's S3FD."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + offset)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + offset)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.asarray(keep, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# S3FD network (module names and indices of syncnet_python's detectors/s3fd/nets.py)


class L2Norm(nn.Module):
    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x):
        return self.weight[None, :, None, None] * x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def _vgg() -> nn.ModuleList:
    layers, c_in = [], 3
    for c_out, n, ceil in ((64, 2, False), (128, 2, False), (256, 3, True), (512, 3, False), (512, 3, False)):
        for _ in range(n):
            layers += [nn.Conv2d(c_in, c_out, 3, 1, padding=1), nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil))
    layers += [nn.Conv2d(512, 1024, 3, 1, padding=6, dilation=6), nn.ReLU(inplace=True),
               nn.Conv2d(1024, 1024, 1, 1), nn.ReLU(inplace=True)]
    return nn.ModuleList(layers)


class S3FDNet(nn.Module):
    """-> (box offsets [B, P, 4], face probability [B, P]) over the P anchors of :func:`priors`."""

    SOURCES = (256, 512, 512, 1024, 512, 256)

    def __init__(self):
        super().__init__()
        self.vgg = _vgg()
        self.L2Norm3_3, self.L2Norm4_3, self.L2Norm5_3 = L2Norm(256, 10), L2Norm(512, 8), L2Norm(512, 5)
        self.extras = nn.ModuleList([nn.Conv2d(1024, 256, 1, 1), nn.Conv2d(256, 512, 3, 2, padding=1),
                                     nn.Conv2d(512, 128, 1, 1), nn.Conv2d(128, 256, 3, 2, padding=1)])
        self.loc = nn.ModuleList(nn.Conv2d(c, 4, 3, 1, padding=1) for c in self.SOURCES)
        self.conf = nn.ModuleList(nn.Conv2d(c, 4 if i == 0 else 2, 3, 1, padding=1)
                                  for i, c in enumerate(self.SOURCES))

    def sources(self, x) -> list[torch.Tensor]:
        out = []
        for (lo, hi), norm in zip(((0, 16), (16, 23), (23, 30)), (self.L2Norm3_3, self.L2Norm4_3, self.L2Norm5_3)):
            for k in range(lo, hi):
                x = self.vgg[k](x)
            out.append(norm(x))
        for k in range(30, len(self.vgg)):
            x = self.vgg[k](x)
        out.append(x)
        for k, layer in enumerate(self.extras):
            x = F.relu(layer(x))
            if k % 2 == 1:
                out.append(x)
        return out

    def forward(self, x):
        locs, confs, shapes = [], [], []
        for i, src in enumerate(self.sources(x)):
            conf = self.conf[i](src)
            if i == 0:          # max-out background: three background scores, one face score
                conf = torch.cat([conf[:, :3].amax(1, keepdim=True), conf[:, 3:]], 1)
            locs.append(self.loc[i](src).permute(0, 2, 3, 1).reshape(len(x), -1, 4))
            confs.append(conf.permute(0, 2, 3, 1).reshape(len(x), -1, 2))
            shapes.append(tuple(src.shape[-2:]))
        self.feature_shapes = shapes
        return torch.cat(locs, 1), torch.cat(confs, 1).softmax(-1)[..., 1]


def priors(image_size: tuple[int, int], feature_shapes) -> torch.Tensor:
    """S3FD anchors (cx, cy, w, h), normalised to the image, in the head's order -> [P, 4]."""
    imh, imw = image_size
    out = []
    for (fh, fw), step, size in zip(feature_shapes, STEPS, MIN_SIZES):
        i, j = torch.meshgrid(torch.arange(fh, dtype=torch.float32), torch.arange(fw, dtype=torch.float32),
                              indexing="ij")
        cx, cy = (j.reshape(-1) + 0.5) * step / imw, (i.reshape(-1) + 0.5) * step / imh
        out.append(torch.stack([cx, cy, torch.full_like(cx, size / imw), torch.full_like(cy, size / imh)], 1))
    return torch.cat(out)


def decode(loc: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """SSD box decoding (variances 0.1, 0.2) -> corners (x1, y1, x2, y2), normalised [P, 4]."""
    centre = anchors[:, :2] + loc[:, :2] * VARIANCE[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])
    return torch.cat([centre - size / 2, centre + size / 2], 1)


def select(boxes: np.ndarray, scores: np.ndarray, conf_th: float) -> np.ndarray:
    """syncnet_python's post-processing: score > conf_th, NMS at 0.3 (the net's Detect), then at 0.1 -> [n, 5]."""
    keep = scores > conf_th
    dets = np.concatenate([boxes[keep], scores[keep, None]], 1).astype(np.float64)
    for iou in (0.3, 0.1):
        dets = dets[nms(dets[:, :4], dets[:, 4], iou)]
    return dets


class S3FD(BatchedNet):
    """Face boxes of RGB frames, as syncnet_python's ``S3FD.detect_faces``."""

    batch_size = 16

    @classmethod
    def load(cls, weights: WeightsFolder, device="cpu") -> "S3FD":
        return cls(weights.load_module("s3fd", S3FDNet()), device)

    @torch.no_grad()
    def detect(self, frames: np.ndarray, conf_th: float = 0.9, scale: float = 0.25) -> list[np.ndarray]:
        """uint8 [N, H, W, 3] -> per frame an array [n, 5] of (x1, y1, x2, y2, score) in frame pixels.

        Small frames are scaled to at least :data:`MIN_DETECT_SIDE` px on their short side (VGG needs it)."""
        H, W = frames.shape[1:3]
        scale = max(scale, MIN_DETECT_SIDE / min(H, W))
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        mean = torch.tensor(S3FD_MEAN, device=self.device)[None, :, None, None]
        out, anchors = [], None
        for sl in batches(len(frames), self.batch_size):
            x = resize(to_nchw(frames[sl], self.device), size) - mean
            loc, score = self.net(x)
            if anchors is None:
                anchors = priors(size, self.net.feature_shapes).to(self.device)
            scale_xy = torch.tensor([W, H, W, H], device=self.device, dtype=torch.float32)
            for b in range(len(x)):
                out.append(select((decode(loc[b], anchors) * scale_xy).cpu().numpy(), score[b].cpu().numpy(), conf_th))
        return out


# ----------------------------------------------------------------------------------------------
# face track -> crops


@dataclass
class FaceCrops:
    crops: np.ndarray            # uint8 [T, 224, 224, 3]
    face_detected: float | None  # fraction of frames with a detection (None for centre crops: nothing detected)
    boxes: np.ndarray | None     # per frame (x, y, s) after smoothing, or None for centre crops


def track(detections: list[np.ndarray]) -> tuple[np.ndarray, float] | None:
    """Highest-scoring face per frame, gaps interpolated, (x, y, s) median-filtered over 13 frames as
    syncnet_python's crop_video -> ([T, 3], detected fraction), or None when no frame has a face."""
    T = len(detections)
    found = [i for i, d in enumerate(detections) if len(d)]
    if not found:
        return None
    best = np.stack([detections[i][np.argmax(detections[i][:, 4]), :4] for i in found])
    boxes = np.stack([np.interp(np.arange(T), found, best[:, k]) for k in range(4)], 1)
    x, y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    s = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    kernel = min(13, T if T % 2 else T - 1)          # 13 as crop_video; shorter tracks (a single image) less
    smooth = np.stack([signal.medfilt(v, kernel_size=kernel) for v in (x, y, s)], 1)
    return smooth, len(found) / T


def _window(frame: torch.Tensor, top: int, bottom: int, left: int, right: int, fill: float) -> torch.Tensor:
    """frame [3, H, W] -> [3, bottom - top, right - left], the parts outside the frame filled with ``fill``."""
    H, W = frame.shape[-2:]
    out = frame.new_full((3, bottom - top, right - left), fill)
    t, b, l, r = max(top, 0), min(bottom, H), max(left, 0), min(right, W)
    if b > t and r > l:
        out[:, t - top:b - top, l - left:r - left] = frame[:, t:b, l:r]
    return out


def track_crops(frames: np.ndarray, boxes: np.ndarray, crop_scale: float = 0.4, size: int = CROP_SIZE) -> np.ndarray:
    """syncnet_python's crop window around each smoothed box (x, y, s) -> uint8 [T, size, size, 3]."""
    out = []
    for frame, (x, y, s) in zip(frames, boxes):
        pad = int(s * (1 + 2 * crop_scale))          # crop_video pads the frame by this much, then indexes with int()
        my, mx = y + pad, x + pad
        top, bottom = int(my - s) - pad, int(my + s * (1 + 2 * crop_scale)) - pad
        left, right = int(mx - s * (1 + crop_scale)) - pad, int(mx + s * (1 + crop_scale)) - pad
        if bottom - top < 2 or right - left < 2:   # degenerate box: keep the geometry defined
            bottom, right = top + 2, left + 2
        face = _window(to_nchw(frame[None])[0], top, bottom, left, right, 110.0)
        out.append(to_uint8_nhwc(resize(face[None], (size, size)))[0])
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def centre_crops(frames: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The largest centred square of each frame, resized -> uint8 [T, size, size, 3]."""
    H, W = frames.shape[1:3]
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    out = [to_uint8_nhwc(resize(to_nchw(frames[sl, top:top + side, left:left + side]), (size, size)))
           for sl in batches(len(frames), 64)]
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


class FaceCropper:
    """Frames -> face crops: S3FD track crops when a detector is given, centre crops otherwise."""

    def __init__(self, detector: S3FD | None = None, conf_th: float = 0.9, scale: float = 0.25,
                 crop_scale: float = 0.4):
        self.detector, self.conf_th, self.scale, self.crop_scale = detector, conf_th, scale, crop_scale

    @property
    def kind(self) -> str:
        return "s3fd" if self.detector is not None else "centre"

    def __call__(self, frames: np.ndarray) -> FaceCrops:
        if self.detector is None:
            return FaceCrops(centre_crops(frames), None, None)
        found = track(self.detector.detect(frames, self.conf_th, self.scale))
        if found is None:
            return FaceCrops(centre_crops(frames), 0.0, None)
        boxes, fraction = found
        return FaceCrops(track_crops(frames, boxes, self.crop_scale), fraction, boxes)
