"""Identity embeddings for CSIM: insightface ``buffalo_l`` (SCRFD-10G detector + ArcFace iResNet-50) on ONNX Runtime.

As insightface's ``FaceAnalysis`` with ``det_size=(640, 640)``:

* SCRFD (``det_10g.onnx``): the frame is resized to fit 640 x 640 keeping its aspect ratio, placed top-left on
  a black canvas, normalised as ``(x - 127.5) / 128`` (RGB).  Its nine outputs are the scores, box distances and
  five-landmark offsets of strides 8, 16 and 32 with two anchors per position; boxes scoring >= 0.5 are kept and
  suppressed at IoU 0.4.  The face used is the one insightface keeps with ``max_num=1``: largest area minus twice
  the squared distance of its centre from the frame's centre.
* Alignment: the similarity transform (Umeyama, as ``skimage.transform.SimilarityTransform``) from the five
  landmarks to ArcFace's 112 x 112 template, applied with bilinear sampling and a black border
  (``cv2.warpAffine`` semantics).
* ArcFace (``w600k_r50.onnx``): RGB ``(x - 127.5) / 127.5`` -> a 512-d embedding.  CSIM is the cosine similarity
  of a frame's embedding to the reference image's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import AvatarForcingError
from .faces import nms
from .images import batches, resize, to_nchw, to_uint8_nhwc
from .weights import WeightsFolder

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
ARCFACE_SIZE = 112
EMBED_DIM = 512
DET_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS = 2
DET_THRESH = 0.5
NMS_IOU = 0.4


def onnx_session(weights: WeightsFolder, key: str, device="cpu"):
    """An ONNX Runtime session of a weights-folder file (CUDA provider on a GPU when onnxruntime-gpu has it)."""
    try:
        import onnxruntime
    except ImportError:
        raise AvatarForcingError("csim needs onnxruntime to run insightface's ONNX models; "
                                 "pip install -e '.[eval]' (or drop csim from --metrics)") from None
    path = weights.path(key)
    if not path.is_file():
        raise weights.error(key, "missing")
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - any failure means: not the real file
        raise weights.error(key, f"is not an ONNX model ONNX Runtime can load ({type(exc).__name__})") from None


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping points src -> dst [N, 2]
    (Umeyama 1991, as ``skimage.transform.SimilarityTransform.estimate``) -> the 2 x 3 matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    A = dst_c.T @ src_c / len(src)
    d = np.array([1.0, -1.0 if np.linalg.det(A) < 0 else 1.0])
    U, S, Vt = np.linalg.svd(A)
    R = U @ np.diag(d) @ Vt
    scale = (S * d).sum() / src_c.var(0).sum()
    return np.concatenate([scale * R, (dst_mean - scale * R @ src_mean)[:, None]], 1)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, (size, size))``: out(x, y) = image(matrix^-1 (x, y)), bilinear, black
    outside.  image uint8 [H, W, 3] -> uint8 [size, size, 3]."""
    H, W = image.shape[:2]
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    sx, sy = (inv[:, :2] @ np.stack([xs.ravel(), ys.ravel()]) + inv[:, 2:]).reshape(2, size, size)
    grid = torch.from_numpy(np.stack([2 * sx / max(W - 1, 1) - 1, 2 * sy / max(H - 1, 1) - 1], -1)).float()[None]
    out = F.grid_sample(to_nchw(image[None]), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return to_uint8_nhwc(out)[0]


def decode_scrfd(outputs: list[np.ndarray], height: int, width: int, threshold: float = DET_THRESH):
    """SCRFD's nine outputs on a ``height x width`` input -> (scores [n], boxes [n, 4], landmarks [n, 5, 2]) in
    input pixels, for every anchor scoring >= threshold."""
    scores, boxes, kps = [], [], []
    for i, stride in enumerate(STRIDES):
        score, dist, kp = (np.asarray(outputs[i + k * len(STRIDES)]) for k in range(3))
        score, dist, kp = score.reshape(-1), dist.reshape(-1, 4) * stride, kp.reshape(-1, 10) * stride
        h, w = height // stride, width // stride
        centres = np.stack(np.mgrid[:h, :w][::-1], -1).reshape(-1, 2).astype(np.float64) * stride
        centres = np.repeat(centres, ANCHORS, axis=0)
        keep = score >= threshold
        c = centres[keep]
        scores.append(score[keep])
        boxes.append(np.concatenate([c - dist[keep, :2], c + dist[keep, 2:]], 1))
        kps.append(c[:, None, :] + kp[keep].reshape(-1, 5, 2))
    return np.concatenate(scores), np.concatenate(boxes), np.concatenate(kps)


class SCRFD:
    """insightface's SCRFD detector (640 x 640) -> the main face's five landmarks."""

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB [H, W, 3] -> (detections [n, 5] (x1, y1, x2, y2, score), landmarks [n, 5, 2]), image pixels."""
        H, W = image.shape[:2]
        new_h, new_w = (DET_SIZE, int(DET_SIZE / (H / W))) if H / W > 1 else (int(DET_SIZE * H / W), DET_SIZE)
        scale = new_h / H
        canvas = torch.zeros(1, 3, DET_SIZE, DET_SIZE)
        canvas[:, :, :new_h, :new_w] = resize(to_nchw(image[None]), (new_h, new_w))
        blob = ((canvas - 127.5) / 128.0).numpy()
        outputs = self.session.run(self.output_names, {self.input_name: blob})
        if len(outputs) != 3 * len(STRIDES):
            raise AvatarForcingError(f"the SCRFD model has {len(outputs)} outputs, not 9 (scores, boxes, landmarks "
                                     "for strides 8/16/32); use buffalo_l's det_10g.onnx")
        outputs = [o[0] if o.ndim == 3 else o for o in outputs]          # batched exports: [1, n, k]
        scores, boxes, kps = decode_scrfd(outputs, DET_SIZE, DET_SIZE)
        dets = np.concatenate([boxes / scale, scores[:, None]], 1)
        keep = nms(dets[:, :4], dets[:, 4], NMS_IOU, offset=1.0)
        return dets[keep], kps[keep] / scale

    def main_face(self, image: np.ndarray) -> np.ndarray | None:
        """Landmarks [5, 2] of the face insightface keeps with max_num=1 (big and central), or None."""
        dets, kps = self.detect(image)
        if not len(dets):
            return None
        area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
        H, W = image.shape[:2]
        offset = ((dets[:, 0] + dets[:, 2]) / 2 - W // 2) ** 2 + ((dets[:, 1] + dets[:, 3]) / 2 - H // 2) ** 2
        return kps[int(np.argmax(area - 2.0 * offset))]


class ArcFace:
    """Aligned 112 x 112 RGB faces -> ArcFace embeddings [N, 512]."""

    def __init__(self, session, batch_size: int = 32):
        self.session, self.batch_size = session, batch_size
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        outs = []
        for sl in batches(len(faces), self.batch_size):
            blob = ((to_nchw(faces[sl]) - 127.5) / 127.5).numpy()
            outs.append(np.asarray(self.session.run([self.output_name], {self.input_name: blob})[0], np.float64))
        return np.concatenate(outs).reshape(len(faces), -1) if outs else np.zeros((0, EMBED_DIM))


class IdentityEmbedder:
    """Frames -> ArcFace embeddings of their main face [T, 512]; rows of frames without a face are NaN."""

    def __init__(self, detector: SCRFD, recognizer: ArcFace):
        self.detector, self.recognizer = detector, recognizer

    @classmethod
    def load(cls, weights: WeightsFolder, device="cpu") -> "IdentityEmbedder":
        det, rec = onnx_session(weights, "scrfd", device), onnx_session(weights, "arcface", device)
        shape = rec.get_inputs()[0].shape
        if len(shape) != 4 or list(shape[1:]) != [3, ARCFACE_SIZE, ARCFACE_SIZE]:
            raise weights.error("arcface", f"takes input {shape}, not [N, 3, 112, 112]")
        if len(det.get_outputs()) != 3 * len(STRIDES):
            raise weights.error("scrfd", f"has {len(det.get_outputs())} outputs, not 9 (SCRFD with landmarks)")
        return cls(SCRFD(det), ArcFace(rec))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        aligned, found = [], []
        for i, frame in enumerate(frames):
            kps = self.detector.main_face(frame)
            if kps is not None:
                aligned.append(warp_affine(frame, similarity_transform(kps, ARCFACE_TEMPLATE), ARCFACE_SIZE))
                found.append(i)
        out = np.full((len(frames), EMBED_DIM), np.nan)
        if found:
            emb = self.recognizer(np.stack(aligned))
            if emb.shape[1] != EMBED_DIM:
                raise AvatarForcingError(f"the ArcFace model returns {emb.shape[1]}-d embeddings, not {EMBED_DIM}; "
                                         "use buffalo_l's w600k_r50.onnx")
            out[found] = emb
        return out

