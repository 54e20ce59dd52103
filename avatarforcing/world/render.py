"""Procedural talking faces: identities, motion, an anti-aliased renderer and a pixel mouth gauge.

Coordinates: the image spans [-1, 1] x [-1, 1] (x right, y down), so one unit is size/2 pixels.
Face features live in face coordinates: the head pose (dx, dy, roll) moves the face by (dx, dy)
and rotates it by ``roll`` radians (clockwise on screen) about its centre; the background and
the torso stay (mostly) put. Shapes are drawn with a one-pixel soft edge on a supersampled grid,
then box-filtered down, so edges are smooth and sub-pixel motion is visible.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .. import AvatarForcingError

HAIR_STYLES = ("bald", "short", "long", "bangs", "side_part")
PATTERNS = ("plain", "stripes", "diagonal", "vignette", "dots")

_CAVITY = np.array([0.22, 0.04, 0.06])     # inside of the mouth
_TEETH = np.array([0.93, 0.92, 0.87])
_SCLERA = np.array([0.96, 0.96, 0.94])
_PUPIL = np.array([0.05, 0.04, 0.04])
_MOUTH_OPEN_MAX = 0.11                     # inner-mouth half-height at mouth_open = 1 (face units)
_LIP = 0.035                               # lip thickness (face units)

_HAIR_PALETTE = {"black": (0.08, 0.07, 0.07), "dark brown": (0.25, 0.15, 0.09), "brown": (0.45, 0.29, 0.16),
                 "blonde": (0.85, 0.72, 0.45), "red": (0.62, 0.25, 0.12), "grey": (0.62, 0.62, 0.62),
                 "blue": (0.18, 0.35, 0.75), "pink": (0.88, 0.45, 0.65)}
_EYE_PALETTE = {"brown": (0.36, 0.22, 0.12), "blue": (0.25, 0.45, 0.75), "green": (0.3, 0.55, 0.3),
                "grey": (0.5, 0.55, 0.58), "hazel": (0.55, 0.45, 0.2)}
_COLOUR_NAMES = {"white": (0.95, 0.95, 0.95), "grey": (0.5, 0.5, 0.5), "black": (0.1, 0.1, 0.1),
                 "red": (0.8, 0.2, 0.2), "orange": (0.9, 0.55, 0.2), "yellow": (0.9, 0.85, 0.3),
                 "green": (0.3, 0.7, 0.3), "teal": (0.2, 0.6, 0.6), "blue": (0.25, 0.4, 0.85),
                 "purple": (0.55, 0.3, 0.7), "pink": (0.9, 0.55, 0.7), "brown": (0.5, 0.33, 0.2),
                 "beige": (0.85, 0.78, 0.62), "navy": (0.12, 0.15, 0.4), "dark green": (0.12, 0.35, 0.15)}


@dataclass
class Identity:
    """Everything that makes one avatar look like itself. Colours are sRGB in [0, 1]."""
    seed: int
    face_rx: float               # face ellipse half-width (face units)
    face_ry: float               # face ellipse half-height
    skin: tuple
    lips: tuple
    hair: tuple
    hair_name: str
    hair_style: str              # one of HAIR_STYLES
    eye_color: tuple
    eye_name: str
    eye_dx: float                # eye centre distance from the face's midline
    eye_y: float
    eye_rx: float
    eye_ry: float
    mouth_y: float
    mouth_w: float               # mouth half-width
    shirt: tuple
    background: tuple
    pattern: str                 # one of PATTERNS
    pattern_color: tuple
    pattern_freq: float

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Identity":
        names = {f.name for f in fields(cls)}
        missing, unknown = names - set(d), set(d) - names
        if missing or unknown:
            raise AvatarForcingError(f"identity dict has missing keys {sorted(missing)} / unknown keys "
                                     f"{sorted(unknown)}; write it with Identity.to_dict()")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def caption(self) -> str:
        hair = "no" if self.hair_style == "bald" else f"{self.hair_name} {self.hair_style.replace('_', '-')}"
        pattern = "" if self.pattern == "plain" else f" {self.pattern}"
        return (f"a person with {hair} hair and {self.eye_name} eyes, wearing a {_colour_name(self.shirt)} "
                f"shirt, talking in front of a {_colour_name(self.background)}{pattern} background")


def _colour_name(rgb) -> str:
    rgb = np.asarray(rgb)
    return min(_COLOUR_NAMES, key=lambda k: float(((np.asarray(_COLOUR_NAMES[k]) - rgb) ** 2).sum()))


def _jitter(rng, rgb, amount=0.05) -> tuple:
    return tuple(float(c) for c in np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0, 1))


def _random_colour(rng, sat=(0.25, 0.75), val=(0.35, 0.95)) -> tuple:
    import colorsys
    return tuple(float(c) for c in colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val)))


def sample_identity(seed: int) -> Identity:
    """A random avatar, deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 101])
    tone = rng.uniform()
    skin = np.array([0.97, 0.83, 0.72]) * (1 - tone) + np.array([0.42, 0.27, 0.18]) * tone
    skin = _jitter(rng, skin, 0.03)
    lips = tuple(float(c) for c in np.clip(np.asarray(skin) * [0.85, 0.55, 0.55] + [0.05, 0, 0.02], 0, 1))
    hair_name = str(rng.choice(list(_HAIR_PALETTE), p=[.22, .2, .16, .14, .1, .08, .05, .05]))
    eye_name = str(rng.choice(list(_EYE_PALETTE)))
    return Identity(
        seed=int(seed),
        face_rx=float(rng.uniform(0.38, 0.48)), face_ry=float(rng.uniform(0.5, 0.6)),
        skin=skin, lips=lips,
        hair=_jitter(rng, _HAIR_PALETTE[hair_name]), hair_name=hair_name,
        hair_style=str(rng.choice(HAIR_STYLES, p=[0.1, 0.3, 0.25, 0.2, 0.15])),
        eye_color=_jitter(rng, _EYE_PALETTE[eye_name]), eye_name=eye_name,
        eye_dx=float(rng.uniform(0.14, 0.19)), eye_y=float(rng.uniform(-0.13, -0.06)),
        eye_rx=float(rng.uniform(0.06, 0.08)), eye_ry=float(rng.uniform(0.035, 0.05)),
        mouth_y=float(rng.uniform(0.25, 0.31)), mouth_w=float(rng.uniform(0.12, 0.17)),
        shirt=_random_colour(rng), background=_random_colour(rng, sat=(0.1, 0.6), val=(0.3, 0.95)),
        pattern=str(rng.choice(PATTERNS)), pattern_color=_random_colour(rng, sat=(0.1, 0.6)),
        pattern_freq=float(rng.uniform(4.0, 9.0)),
    )


# ----------------------------------------------------------------------------------------------
# motion


@dataclass
class Motion:
    mouth_open: np.ndarray       # float32 [T] in [0, 1]
    head_pose: np.ndarray        # float32 [T, 3]: dx, dy (image units, 1 = size/2 px), roll (radians)
    blink: np.ndarray            # float32 [T] in [0, 1], 1 = eyes closed

    def __len__(self) -> int:
        return len(self.mouth_open)


_BLINK_PROFILE = np.array([0.45, 1.0, 1.0, 0.6, 0.2], dtype=np.float32)


def sample_motion(T: int, seed: int, envelope: np.ndarray | None = None, fps: int = 25) -> Motion:
    """Mouth follows ``envelope`` (closed where None); the head sways and nods smoothly (nodding a
    little more while speaking); blinks come every ~2-6 s. Prefix-consistent in ``T``; frame 0
    never blinks."""
    if T <= 0:
        raise AvatarForcingError(f"sample_motion needs T > 0 frames, got {T}")
    if envelope is None:
        envelope = np.zeros(T, np.float32)
    envelope = np.asarray(envelope, dtype=np.float32)
    if envelope.shape != (T,):
        raise AvatarForcingError(f"envelope has shape {envelope.shape} but T = {T}; pass one value per frame")
    rng = np.random.default_rng([seed, 202])
    t = np.arange(T) / fps
    pose = np.zeros((T, 3))
    amplitude = (0.05, 0.035, 0.06)                  # dx, dy, roll (radians)
    for axis in range(3):                            # sum of slow sinusoids per axis
        freqs = rng.uniform(0.05, 0.45, size=3)
        phases = rng.uniform(0, 2 * np.pi, size=3)
        weights = rng.uniform(0.3, 1.0, size=3)
        pose[:, axis] = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
        pose[:, axis] *= amplitude[axis] / weights.sum()
    # Speech-coupled nod: the slow loudness pushes the head down a little.
    kernel = np.hanning(13)
    kernel /= kernel.sum()
    slow = np.convolve(np.pad(envelope, (12, 0), mode="edge"), kernel, mode="valid")[:T]  # causal
    pose[:, 1] += 0.02 * slow
    blink = np.zeros(T + len(_BLINK_PROFILE), np.float32)
    frame = int(rng.uniform(1.0, 4.0) * fps)
    while frame < T:
        blink[frame:frame + len(_BLINK_PROFILE)] = _BLINK_PROFILE
        frame += int(rng.uniform(2.0, 6.0) * fps)
    return Motion(mouth_open=np.clip(envelope, 0, 1).astype(np.float32),
                  head_pose=pose.astype(np.float32), blink=blink[:T])


# ----------------------------------------------------------------------------------------------
# rendering


def _cover(dist: np.ndarray, px: float) -> np.ndarray:
    """Signed distance (negative inside) -> coverage in [0, 1] with a one-pixel soft edge."""
    return np.clip(0.5 - dist / px, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry, px):
    """Coverage of an axis-aligned ellipse (first-order signed distance)."""
    u, v = (x - cx) / rx, (y - cy) / ry
    f = u * u + v * v - 1.0
    grad = 2.0 * np.sqrt((u / rx) ** 2 + (v / ry) ** 2) + 1e-6
    return _cover(f / grad, px)


def _flat_ellipse(x, y, cx, cy, rx, ry, px):
    """Coverage of an ellipse whose half-height ``ry`` [B, 1, 1] may shrink to zero: below 1.5 px
    it keeps that height and fades out instead (the distance estimate breaks for needle shapes)."""
    ry_min = 1.5 * px
    return _ellipse(x, y, cx, cy, rx, np.maximum(ry, ry_min), px) * np.clip(ry / ry_min, 0.0, 1.0)


def _paint(img, cover, colour):
    """Composite ``colour`` over ``img`` [..., 3] with ``cover`` [...] (in place)."""
    cover = cover[..., None]
    img *= 1.0 - cover
    img += cover * np.asarray(colour, dtype=np.float32)


def _background(ident: Identity, x, y, px) -> np.ndarray:
    img = np.empty(x.shape + (3,), np.float32)
    img[:] = ident.background
    f = ident.pattern_freq
    if ident.pattern == "stripes":
        s = np.sin(np.pi * f * x / 2)
        _paint(img, 0.6 * _cover(np.abs(s) * 2 / (np.pi * f) - 0.25 / f, px), ident.pattern_color)
    elif ident.pattern == "diagonal":
        s = np.sin(np.pi * f * (x + y) / 2 / np.sqrt(2))
        _paint(img, 0.6 * _cover(np.abs(s) * 2 / (np.pi * f) - 0.25 / f, px), ident.pattern_color)
    elif ident.pattern == "vignette":
        _paint(img, np.clip(0.6 * (x * x + y * y) / 2, 0, 1), ident.pattern_color)
    elif ident.pattern == "dots":
        gx = (x * f / 2) % 1.0 - 0.5
        gy = (y * f / 2) % 1.0 - 0.5
        _paint(img, 0.7 * _cover((np.sqrt(gx * gx + gy * gy) - 0.18) * 2 / f, px), ident.pattern_color)
    return img


class _Chunk:
    """A chunk of B frames being drawn; hands out windows of the canvas around a shape's box so
    that each shape costs its own area, not the whole frame."""

    def __init__(self, img, X, Y, pose, px):
        self.img, self.X, self.Y, self.px = img, X, Y, px        # img [B, S, S, 3]; X, Y [S, S]
        self.dx, self.dy, roll = (pose[:, k][:, None, None] for k in range(3))   # [B, 1, 1]
        self.c, self.s = np.cos(roll), np.sin(roll)
        self.pose = pose

    def _window(self, xs, ys):
        """Pixel window covering image points xs, ys (any shape) -> (rows, cols) slices or None."""
        S, px = self.X.shape[0], self.px
        c0, c1 = int(np.floor((xs.min() + 1) / px)) - 2, int(np.ceil((xs.max() + 1) / px)) + 2
        r0, r1 = int(np.floor((ys.min() + 1) / px)) - 2, int(np.ceil((ys.max() + 1) / px)) + 2
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, S), min(r1, S)
        return None if c0 >= c1 or r0 >= r1 else (slice(r0, r1), slice(c0, c1))

    def face(self, x0, x1, y0, y1):
        """Face-coord box -> (fx, fy [B, h, w], canvas view [B, h, w, 3]) or None if off-canvas."""
        qx = np.array([x0, x1, x0, x1])
        qy = np.array([y0, y0, y1, y1])
        dx, dy, c, s = (v[:, :, 0] for v in (self.dx, self.dy, self.c, self.s))      # [B, 1]
        win = self._window(c * qx - s * qy + dx, s * qx + c * qy + dy)               # corners [B, 4]
        if win is None:
            return None
        rx_, ry_ = self.X[win][None] - self.dx, self.Y[win][None] - self.dy
        return self.c * rx_ + self.s * ry_, -self.s * rx_ + self.c * ry_, self.img[(slice(None),) + win]

    def image(self, x0, x1, y0, y1):
        """Image-coord box -> (X, Y [h, w], canvas view [B, h, w, 3]) or None."""
        win = self._window(np.array([x0, x1]), np.array([y0, y1]))
        return None if win is None else (self.X[win], self.Y[win], self.img[(slice(None),) + win])


def _draw_face(ident: Identity, ch: _Chunk, mouth, blink):
    """Draw the avatar on a chunk of frames; mouth, blink: [B]."""
    I, px = ident, ch.px
    skin = np.asarray(I.skin)
    rx, ry = I.face_rx, I.face_ry

    def paint(box, cover_fn, colour):
        win = ch.face(*box)
        if win is not None:
            fx, fy, view = win
            _paint(view, cover_fn(fx, fy), colour)

    if I.hair_style == "long":                                       # hair behind the head
        paint((-rx * 1.25, rx * 1.25, 0.12 - ry * 1.15, 0.75),
              lambda x, y: _ellipse(x, y, 0.0, 0.12, rx * 1.25, ry * 1.15, px) * _cover(y - 0.75, px), I.hair)
    dx_max = float(np.abs(ch.pose[:, 0]).max())
    win = ch.image(-0.8 - 0.3 * dx_max, 0.8 + 0.3 * dx_max, 0.75, 1.0)
    if win is not None:                                              # torso: follows the head a little
        X, Y, view = win
        _paint(view, _ellipse(X[None], Y[None], 0.3 * ch.dx, 1.3, 0.8, 0.55, px), I.shirt)
    paint((-0.15, 0.15, 0.2, 1.6),
          lambda x, y: _cover(np.maximum(np.abs(x) - 0.15, np.maximum(0.2 - y, y - 1.6)), px), skin * 0.82)
    for side in (-1, 1):                                             # ears
        paint((side * rx - 0.07, side * rx + 0.07, 0.02 - 0.11, 0.02 + 0.11),
              lambda x, y: _ellipse(x, y, side * rx, 0.02, 0.07, 0.11, px), skin * 0.9)
    paint((-rx, rx, -ry, ry), lambda x, y: _ellipse(x, y, 0.0, 0.0, rx, ry, px), skin)
    if I.hair_style != "bald":                                       # hair on top of the head
        a, b = 0.12 if I.hair_style == "side_part" else 0.0, {"bangs": 0.05, "side_part": 0.12}.get(I.hair_style, 0.25)
        top = {"bangs": -0.3, "side_part": -0.5}.get(I.hair_style, -0.55) * ry
        hairline = lambda x: top + b * (x / rx) ** 2 + a * (x / rx)                  # noqa: E731
        lowest = float(hairline(np.linspace(-1.07, 1.07, 9) * rx).max())
        paint((-rx * 1.07, rx * 1.07, -0.03 - ry * 1.06, min(lowest, ry) + 0.02),
              lambda x, y: _ellipse(x, y, 0.0, -0.03, rx * 1.07, ry * 1.06, px) * _cover(y - hairline(x), px),
              I.hair)
    open_ry = I.eye_ry * (1.0 - blink)[:, None, None]                # [B, 1, 1]
    for side in (-1, 1):
        ex, ey = side * I.eye_dx, I.eye_y
        win = ch.face(ex - I.eye_rx * 1.1, ex + I.eye_rx * 1.1, ey - I.eye_ry - 0.08, ey + I.eye_ry)
        if win is None:
            continue
        x, y, view = win
        _paint(view, _ellipse(x, y, ex, ey - I.eye_ry - 0.06, I.eye_rx * 1.1, 0.018, px), np.asarray(I.hair) * 0.8)
        sclera = _flat_ellipse(x, y, ex, ey, I.eye_rx, open_ry, px)
        _paint(view, sclera, _SCLERA)
        _paint(view, sclera * _ellipse(x, y, ex, ey, I.eye_ry * 0.95, I.eye_ry * 0.95, px), I.eye_color)
        _paint(view, sclera * _ellipse(x, y, ex, ey, I.eye_ry * 0.45, I.eye_ry * 0.45, px), _PUPIL)
        _paint(view, _ellipse(x, y, ex, ey - open_ry, I.eye_rx * 1.05, 0.012, px), _PUPIL * 2)   # eyelid
    paint((-0.035, 0.035, 0.1 - 0.055, 0.1 + 0.055),
          lambda x, y: _ellipse(x, y, 0.0, 0.1, 0.035, 0.055, px), skin * 0.82)                  # nose
    h = _MOUTH_OPEN_MAX * mouth[:, None, None]                       # [B, 1, 1]
    my, extent = I.mouth_y, _LIP + _MOUTH_OPEN_MAX
    win = ch.face(-I.mouth_w, I.mouth_w, my - extent, my + extent)
    if win is not None:
        x, y, view = win
        _paint(view, _ellipse(x, y, 0.0, my, I.mouth_w, _LIP + h, px), I.lips)
        cavity = _flat_ellipse(x, y, 0.0, my, I.mouth_w * 0.8, h, px)
        _paint(view, cavity, _CAVITY)
        _paint(view, cavity * _cover(y - (my - 0.45 * h), px), _TEETH)


def render(identity: Identity, mouth_open, head_pose, blink, size: int = 64, supersample: int = 3,
           chunk: int = 16) -> np.ndarray:
    """Render T frames -> uint8 [T, size, size, 3].

    mouth_open [T] in [0, 1]; head_pose [T, 3] = (dx, dy, roll); blink [T] in [0, 1]."""
    mouth = np.asarray(mouth_open, dtype=np.float32).reshape(-1)
    T = len(mouth)
    pose = np.asarray(head_pose, dtype=np.float32).reshape(T, 3) if np.size(head_pose) == 3 * T else None
    blink = np.asarray(blink, dtype=np.float32).reshape(-1)
    if pose is None or blink.shape != (T,):
        raise AvatarForcingError(f"render got mouth_open [{T}], head_pose {np.shape(head_pose)}, blink "
                                 f"{np.shape(blink)}; pass [T], [T, 3] and [T] for the same T")
    if size < 8 or size % 2:
        raise AvatarForcingError(f"render size must be an even number >= 8, got {size}")
    S = size * supersample
    px = 2.0 / S                                                     # one supersampled pixel
    coords = (np.arange(S, dtype=np.float32) + 0.5) * px - 1.0
    Y, X = np.meshgrid(coords, coords, indexing="ij")                # [S, S]
    bg = _background(identity, X, Y, px)                             # [S, S, 3]
    out = np.empty((T, size, size, 3), np.uint8)
    for i0 in range(0, T, chunk):
        sl = slice(i0, min(T, i0 + chunk))
        img = np.repeat(bg[None], sl.stop - sl.start, axis=0)         # [B, S, S, 3]
        _draw_face(identity, _Chunk(img, X, Y, pose[sl], px), mouth[sl], blink[sl])
        img = img.reshape(-1, size, supersample, size, supersample, 3).mean(axis=(2, 4))
        out[sl] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# measuring the mouth back from pixels


def measure_mouth_open(frames: np.ndarray, identity: Identity, head_pose) -> np.ndarray:
    """Estimate mouth_open from rendered pixels -> float32 [T].

    Samples the mouth region in face coordinates (known pose), classifies each sample by its
    nearest reference colour (skin, lips vs. inner mouth, teeth) and converts the inner-mouth
    area to the inner ellipse's half-height."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise AvatarForcingError(f"measure_mouth_open needs frames [T, H, W, 3], got {frames.shape}")
    T, H, W, _ = frames.shape
    pose = np.asarray(head_pose, dtype=np.float32).reshape(T, 3)
    a = identity.mouth_w * 0.8
    half_h = _MOUTH_OPEN_MAX + 0.01
    n = 48
    qx = np.linspace(-a, a, n)
    qy = identity.mouth_y + np.linspace(-half_h, half_h, n)
    QY, QX = np.meshgrid(qy, qx, indexing="ij")                      # face coords [n, n]
    cell = (2 * a / (n - 1)) * (2 * half_h / (n - 1))
    protos = np.stack([identity.skin, identity.lips, _CAVITY, _TEETH]).astype(np.float32)  # [4, 3]
    out = np.zeros(T, np.float32)
    img = frames.astype(np.float32) / 255.0
    for t in range(T):
        dx, dy, roll = pose[t]
        c, s = np.cos(roll), np.sin(roll)
        x = c * QX - s * QY + dx                                     # image coords
        y = s * QX + c * QY + dy
        col = _bilinear(img[t], (x + 1) * W / 2 - 0.5, (y + 1) * H / 2 - 0.5)   # [n, n, 3]
        d = ((col[..., None, :] - protos) ** 2).sum(-1)              # [n, n, 4]
        w = np.exp(-(d - d.min(-1, keepdims=True)) / 0.002)
        inner = (w[..., 2:].sum(-1) / w.sum(-1))                     # soft class probability
        area = inner.sum() * cell
        out[t] = area / (np.pi * a) / _MOUTH_OPEN_MAX                 # ellipse: area = pi * a * h
    return np.clip(out, 0.0, 1.5)


def _bilinear(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample img [H, W, C] at pixel coordinates u (x), v (y) with bilinear interpolation."""
    H, W, _ = img.shape
    u = np.clip(u, 0, W - 1.001)
    v = np.clip(v, 0, H - 1.001)
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = (u - u0)[..., None], (v - v0)[..., None]
    return ((1 - fu) * (1 - fv) * img[v0, u0] + fu * (1 - fv) * img[v0, u0 + 1]
            + (1 - fu) * fv * img[v0 + 1, u0] + fu * fv * img[v0 + 1, u0 + 1])
