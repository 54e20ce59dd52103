"""World v2: textured talking heads that turn, move, zoom and change light, with viseme mouths (>= 128x128).

A new module rather than new parameters of :mod:`.render`: v1 is the shipped demo's world and its every pixel
is pinned by tests, while v2 draws differently throughout (a 3-D head, textures, lighting), so sharing the
drawing code would mean branching in every line.  v2 reuses v1's identity sampler (colours, geometry) and its
anti-aliased primitives, and adds:

* **A 3-D head.**  The head is an ellipsoid (half-axes face_rx, face_ry, depth) turned by yaw and pitch, then
  rolled, zoomed and shifted in the image.  Each pixel is ray-cast onto it and the face is painted in the head's
  own coordinates (u, v) = (x, y) of the hit point, so turning foreshortens and shifts the features (the face
  centre moves by depth * sin(yaw) while the outline stays put) and the far ear hides behind the head.
* **Textures.**  Per-identity value noise (deterministic from the seed): skin blotches and freckles, strand-like
  hair, a textured background under v1's pattern.
* **Light.**  Lambert shading of the head from a light at (azimuth, elevation), an intensity, and a colour
  temperature (Kelvin) that tints the whole frame, background included.
* **Visemes.**  The mouth is drawn from the five shape parameters of :mod:`.speech_tts` (opening, width,
  rounding, upper and lower teeth), so closed, open, wide, round and f/v mouths look different, not only more or
  less open.

Design note, long horizons (:func:`sample_motion_v2`).  Pose and light have slow parts (periods of 1-5 minutes:
the head drifts across the frame and zooms, the light circles and warms or cools) on top of v1-like sways and of
head turns every 5-20 s.  So after a minute the frame no longer looks like the reference frame: colour, shading,
scale and which side of the face is visible have all moved, and copying the reference channel pixel-for-pixel is
wrong.  A strictly causal model without anchors sees only its own recent frames; the slow drifts are
indistinguishable from its own slow errors (a slightly too warm skin, a slightly too big head), so those errors
are expected to accumulate over 3-5 minutes.  What stays fixed is identity (face shape, skin, hair, eyes, shirt,
background): the style anchor is the only place to read it from under the current light and pose.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .. import AvatarForcingError
from .render import (_CAVITY, _LIP, _MOUTH_OPEN_MAX, _PUPIL, _SCLERA, _TEETH, _BLINK_PROFILE, Identity,
                     _background, _cover, _ellipse, _flat_ellipse, _paint, _bilinear, sample_identity)
from .speech_tts import SHAPE_KEYS

POSE_KEYS = ("dx", "dy", "roll", "yaw", "pitch", "zoom")
LIGHT_KEYS = ("azimuth", "elevation", "intensity", "kelvin")


@dataclass
class IdentityV2:
    """v1's identity (colours, geometry) plus what v2 adds; fixed over a clip."""
    base: Identity
    depth: float                 # head half-depth (face units)
    skin_texture: float          # amplitude of the skin's blotch noise
    freckles: float              # freckle density (0 = none)
    hair_texture: float          # amplitude of the hair's strand noise
    bg_texture: float            # amplitude of the background's noise

    def to_dict(self) -> dict:
        return dict({k: v for k, v in asdict(self).items() if k != "base"}, base=self.base.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "IdentityV2":
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise AvatarForcingError(f"v2 identity dict has keys {sorted(d)}, expected {sorted(names)}; "
                                     "write it with IdentityV2.to_dict()")
        return cls(**dict(d, base=Identity.from_dict(d["base"])))

    @property
    def seed(self) -> int:
        return self.base.seed

    def caption(self) -> str:
        return self.base.caption()


def sample_identity_v2(seed: int) -> IdentityV2:
    """A random v2 avatar, deterministic from ``seed``; its ``base`` is v1's ``sample_identity(seed)``."""
    rng = np.random.default_rng([seed, 303])
    return IdentityV2(base=sample_identity(seed), depth=float(rng.uniform(0.36, 0.46)),
                      skin_texture=float(rng.uniform(0.03, 0.09)), freckles=float(rng.choice([0.0, 0.0, 0.5, 1.0])),
                      hair_texture=float(rng.uniform(0.12, 0.3)), bg_texture=float(rng.uniform(0.06, 0.2)))


# ----------------------------------------------------------------------------------------------
# motion and light over long horizons


@dataclass
class MotionV2:
    mouth: np.ndarray            # float32 [T, len(SHAPE_KEYS)] mouth shape (speech_tts)
    visemes: np.ndarray          # int64 [T]
    head_pose: np.ndarray        # float32 [T, 6]: POSE_KEYS (dx, dy image units; roll, yaw, pitch radians; zoom)
    light: np.ndarray            # float32 [T, 4]: LIGHT_KEYS (radians, radians, gain, Kelvin)
    blink: np.ndarray            # float32 [T] in [0, 1]

    def __len__(self) -> int:
        return len(self.blink)


def _slow(rng, t, amplitude, periods):
    """Sum of three sinusoids with periods drawn from ``periods`` (seconds), scaled to ``amplitude``."""
    p = rng.uniform(*periods, size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    w = rng.uniform(0.4, 1.0, size=3)
    return amplitude * (w[:, None] * np.sin(2 * np.pi * t[None] / p[:, None] + phase[:, None])).sum(0) / w.sum()


def _turns(rng, T, fps, amplitude):
    """Head turns: a new target every 5-20 s, approached with a 0.6 s time constant (causal) -> [T]."""
    target = np.zeros(T)
    frame, value = 0, 0.0
    while frame < T:
        target[frame:] = value
        frame += int(rng.uniform(5.0, 20.0) * fps)
        value = rng.uniform(-amplitude, amplitude)
    out = np.zeros(T)
    a = 1.0 - np.exp(-1.0 / (0.6 * fps))
    for i in range(1, T):
        out[i] = out[i - 1] + a * (target[i] - out[i - 1])
    return out


def _sway(rng, t, amplitudes, periods=(1.6, 3.2)) -> np.ndarray:
    """One clip-long sway: a sinusoid whose period, phase and amplitudes are drawn once per clip -> [T, len(amplitudes)].

    Unlike :func:`_slow`'s sums and :func:`_turns`' jumps, nothing new happens after the first period: where the
    head goes next is fixed by where it has been.  Each component has its own amplitude, drawn from [a/2, a], and
    its own phase lag of up to a quarter period behind the first (a head that turns, then leans)."""
    period = rng.uniform(*periods)
    phase = rng.uniform(0, 2 * np.pi)
    a = np.asarray(amplitudes, np.float64)
    amp = rng.uniform(0.5, 1.0, size=len(a)) * a * rng.choice([-1.0, 1.0], size=len(a))
    lag = np.concatenate([[0.0], rng.uniform(0, np.pi / 2, size=len(a) - 1)])
    return amp[None] * np.sin(2 * np.pi * t[:, None] / period + phase - lag[None])


SWAY_AMPLITUDES = (0.18, 0.06, 0.15, 0.60, 0.15)    # dx, dy, roll, yaw, pitch of world v3's sway


def sample_motion_v2(T: int, seed: int, mouth: np.ndarray, visemes: np.ndarray, fps: int = 25,
                     sway: bool = False) -> MotionV2:
    """Pose, light and blinks for T frames (deterministic from ``seed``, prefix-consistent in ``T``) around a
    given mouth track (:func:`.speech_tts.synth_tts`).  See the module's design note.

    ``sway=True`` is world v3's motion: the unpredictable parts (the fast sways and the head turns) are replaced
    by one large sway of fixed period (1.6-3.2 s, :func:`_sway`), so the head is always moving and its next pose
    is determined by its recent ones; the slow drifts, the light and the blinks are v2's."""
    mouth = np.asarray(mouth, np.float32)
    if T <= 0 or mouth.shape != (T, len(SHAPE_KEYS)) or np.shape(visemes) != (T,):
        raise AvatarForcingError(f"sample_motion_v2 needs T > 0, mouth [T, {len(SHAPE_KEYS)}] and visemes [T], got "
                                 f"T = {T}, {mouth.shape} and {np.shape(visemes)}")
    rng = lambda k: np.random.default_rng([seed, 404, k])           # noqa: E731  one stream each: prefix-consistent
    t = np.arange(T) / fps
    fast = (1.5, 20.0)                                               # v1-like sways and nods
    slow = (60.0, 300.0)                                             # drifts over minutes
    if sway:
        sw = _sway(rng(19), t, SWAY_AMPLITUDES)
        pose = np.stack([
            sw[:, 0] + _slow(rng(1), t, 0.16, slow),                                     # dx
            sw[:, 1] + _slow(rng(3), t, 0.10, slow) + 0.02 * mouth[:, 0],                # dy, nods while speaking
            sw[:, 2] + _slow(rng(5), t, 0.08, slow),                                     # roll
            sw[:, 3],                                                                    # yaw
            sw[:, 4] + _slow(rng(9), t, 0.18, slow),                                     # pitch
            np.exp(_slow(rng(11), t, 0.18, slow)),                                       # zoom
        ], axis=1)
    else:
        pose = np.stack([
            _slow(rng(0), t, 0.04, fast) + _slow(rng(1), t, 0.16, slow),                       # dx
            _slow(rng(2), t, 0.03, fast) + _slow(rng(3), t, 0.10, slow) + 0.02 * mouth[:, 0],  # dy, nods while speaking
            _slow(rng(4), t, 0.05, fast) + _slow(rng(5), t, 0.08, slow),                       # roll
            _slow(rng(6), t, 0.12, fast) + _turns(rng(7), T, fps, 0.6),                        # yaw
            _slow(rng(8), t, 0.06, fast) + _slow(rng(9), t, 0.18, slow),                       # pitch
            np.exp(_slow(rng(10), t, 0.03, fast) + _slow(rng(11), t, 0.18, slow)),             # zoom
        ], axis=1)
    az0, k0 = rng(12).uniform(-0.8, 0.8), rng(13).uniform(4500, 7000)
    light = np.stack([
        az0 + _slow(rng(14), t, 1.2, slow),                                                # azimuth
        0.5 + _slow(rng(15), t, 0.3, slow),                                                # elevation
        1.0 + _slow(rng(16), t, 0.25, slow),                                               # intensity
        np.clip(k0 + _slow(rng(17), t, 2000.0, slow), 2800, 9000),                         # colour temperature
    ], axis=1)
    blink = np.zeros(T + len(_BLINK_PROFILE), np.float32)
    blinks = rng(18)
    frame = int(blinks.uniform(1.0, 4.0) * fps)
    while frame < T:
        blink[frame:frame + len(_BLINK_PROFILE)] = _BLINK_PROFILE
        frame += int(blinks.uniform(2.0, 6.0) * fps)
    return MotionV2(mouth=mouth, visemes=np.asarray(visemes, np.int64), head_pose=pose.astype(np.float32),
                    light=light.astype(np.float32), blink=blink[:T])


# ----------------------------------------------------------------------------------------------
# rendering


def kelvin_rgb(kelvin) -> np.ndarray:
    """Colour temperature -> linear RGB gain [..., 3], 1 at 6500 K (a smooth fit of the blackbody locus)."""
    k = np.asarray(kelvin, np.float64)[..., None] / 6500.0
    gain = np.concatenate([k ** -0.55, k ** -0.12, k ** 0.45], axis=-1)
    return (gain / gain.mean(-1, keepdims=True)).astype(np.float32)


def _noise(seed: int, tag: int, res: int = 64, octaves=(4, 8, 16, 32)) -> np.ndarray:
    """Value noise on a [res, res] grid in about [-1, 1], deterministic from (seed, tag)."""
    from scipy.ndimage import zoom as _zoom
    rng = np.random.default_rng([seed, 505, tag])
    out = np.zeros((res, res), np.float32)
    for i, o in enumerate(octaves):
        out += _zoom(rng.uniform(-1, 1, (o, o)), res / o, order=1, mode="nearest")[:res, :res] * 0.6 ** i
    return out / sum(0.6 ** i for i in range(len(octaves)))


def _sample(grid: np.ndarray, x, y, span: float = 1.0) -> np.ndarray:
    """Noise ``grid`` [R, R] at points x, y in [-span, span] -> array of x's shape."""
    R = grid.shape[0]
    u, v = (x / span + 1) * (R - 1) / 2, (y / span + 1) * (R - 1) / 2
    return _bilinear(grid[..., None], u, v)[..., 0]


def _rotation(yaw, pitch):
    """Head -> view rotation [B, 3, 3]: yaw about the vertical axis, then pitch about the horizontal one."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    ry = np.stack([np.stack([cy, zero, sy], -1), np.stack([zero, one, zero], -1), np.stack([-sy, zero, cy], -1)], -2)
    rp = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, cp, -sp], -1), np.stack([zero, sp, cp], -1)], -2)
    return rp @ ry


def _draw_mouth(I: Identity, u, v, img, shape, px):
    o, w, r, tu, tl = (shape[:, k][:, None, None] for k in range(len(SHAPE_KEYS)))
    my, mw = I.mouth_y, I.mouth_w * w
    h = _MOUTH_OPEN_MAX * o
    lip = _LIP * (0.7 + 0.3 * (o > 0.02) + 0.8 * r)
    _paint(img, _ellipse(u, v, 0.0, my, mw, lip + h, px), I.lips)
    _paint(img, _ellipse(u, v, 0.0, my, mw * 1.02, 0.004 + 0.002 * r, px) * (o < 0.02), np.asarray(I.lips) * 0.6)
    cavity = _flat_ellipse(u, v, 0.0, my, mw * 0.8, h, px)
    _paint(img, cavity, _CAVITY)
    _paint(img, cavity * tu * _cover(v - (my - h + 0.045), px), _TEETH)
    _paint(img, cavity * tl * _cover((my + h - 0.04) - v, px), _TEETH * 0.92)


def _draw_face_texture(ident: IdentityV2, u, v, shape, blink, px, noise) -> np.ndarray:
    """The face painted in head coordinates (u, v) [B, H, W] -> colour [B, H, W, 3]."""
    I = ident.base
    skin = np.asarray(I.skin, np.float32)
    img = np.empty(u.shape + (3,), np.float32)
    img[:] = skin
    img *= (1 + ident.skin_texture * _sample(noise["skin"], u, v))[..., None]
    if ident.freckles:
        f = np.clip((_sample(noise["freckles"], u, v) - 0.55) * 8, 0, 1) * ident.freckles
        _paint(img, 0.35 * f * np.clip(1 - np.abs(v - 0.02) / 0.15, 0, 1), skin * 0.7)
    rx, ry = I.face_rx, I.face_ry
    if I.hair_style != "bald":
        a, b = (0.12 if I.hair_style == "side_part" else 0.0), {"bangs": 0.05, "side_part": 0.12}.get(I.hair_style, 0.25)
        top = {"bangs": -0.3, "side_part": -0.5}.get(I.hair_style, -0.55) * ry
        strands = 1 + ident.hair_texture * _sample(noise["hair"], u * 3.0, v * 0.6, span=3.0)
        hair_mask = _cover(v - (top + b * (u / rx) ** 2 + a * (u / rx)), px)
        _paint(img, hair_mask, I.hair)
        img *= (1 + (strands - 1) * hair_mask)[..., None]
    open_ry = I.eye_ry * (1.0 - blink)[:, None, None]
    for side in (-1, 1):
        ex, ey = side * I.eye_dx, I.eye_y
        _paint(img, _ellipse(u, v, ex, ey - I.eye_ry - 0.06, I.eye_rx * 1.1, 0.018, px), np.asarray(I.hair) * 0.8)
        sclera = _flat_ellipse(u, v, ex, ey, I.eye_rx, open_ry, px)
        _paint(img, sclera, _SCLERA)
        _paint(img, sclera * _ellipse(u, v, ex, ey, I.eye_ry * 0.95, I.eye_ry * 0.95, px), I.eye_color)
        _paint(img, sclera * _ellipse(u, v, ex, ey, I.eye_ry * 0.45, I.eye_ry * 0.45, px), _PUPIL)
        _paint(img, _ellipse(u, v, ex, ey - open_ry, I.eye_rx * 1.05, 0.012, px), _PUPIL * 2)
    _paint(img, 0.6 * _ellipse(u, v, 0.0, 0.09, 0.04, 0.07, px), skin * 0.8)                      # nose
    for side in (-1, 1):
        _paint(img, _ellipse(u, v, side * 0.022, 0.155, 0.012, 0.008, px), skin * 0.45)          # nostrils
    _draw_mouth(I, u, v, img, shape, px)
    return img


def render_v2(identity: IdentityV2, mouth, head_pose, light, blink, size: int = 128, supersample: int = 1,
              chunk: int = 8) -> np.ndarray:
    """Render T frames -> uint8 [T, size, size, 3]: mouth [T, 5] (SHAPE_KEYS), head_pose [T, 6] (POSE_KEYS),
    light [T, 4] (LIGHT_KEYS), blink [T].  Frames are independent: any subset of a clip renders alike."""
    blink = np.asarray(blink, np.float32).reshape(-1)
    T = len(blink)
    mouth, pose, light = (np.asarray(a, np.float32) for a in (mouth, head_pose, light))
    if mouth.shape != (T, len(SHAPE_KEYS)) or pose.shape != (T, len(POSE_KEYS)) or light.shape != (T, len(LIGHT_KEYS)):
        raise AvatarForcingError(f"render_v2 got mouth {mouth.shape}, head_pose {pose.shape}, light {light.shape}, "
                                 f"blink [{T}]; pass [T, 5], [T, 6], [T, 4] and [T] for the same T")
    if size < 16 or size % 2:
        raise AvatarForcingError(f"render_v2 size must be an even number >= 16, got {size}")
    I = identity.base
    noise = {name: _noise(I.seed, tag) for tag, name in enumerate(("skin", "freckles", "hair", "background"))}
    S = size * supersample
    px = 2.0 / S
    coords = (np.arange(S, dtype=np.float32) + 0.5) * px - 1.0
    Y, X = np.meshgrid(coords, coords, indexing="ij")
    bg = _background(I, X, Y, px) * (1 + identity.bg_texture * _sample(noise["background"], X, Y))[..., None]
    semi = np.array([I.face_rx, I.face_ry, identity.depth], np.float32)
    out = np.empty((T, size, size, 3), np.uint8)
    for i0 in range(0, T, chunk):
        sl = slice(i0, min(T, i0 + chunk))
        dx, dy, roll, yaw, pitch, zoom = (pose[sl, k][:, None, None] for k in range(6))
        az, el, gain, kelvin = (light[sl, k] for k in range(4))
        tint = kelvin_rgb(kelvin)[:, None, None, :] * gain[:, None, None, None]        # [B, 1, 1, 3]
        L = np.stack([np.sin(az) * np.cos(el), -np.sin(el), np.cos(az) * np.cos(el)], -1)  # [B, 3] to the light
        # image -> head plane: undo shift and zoom, then roll
        x0, y0 = (X[None] - dx) / zoom, (Y[None] - dy) / zoom
        c, s = np.cos(roll), np.sin(roll)
        qx, qy = c * x0 + s * y0, -s * x0 + c * y0                                     # [B, S, S]
        fpx = px / zoom                                                                 # one pixel, face units
        img = bg[None] * (0.88 + 0.12 * np.clip(X[None] * np.sin(az)[:, None, None] + 0.5, 0, 1))[..., None]
        R = _rotation(yaw[:, 0, 0], pitch[:, 0, 0])                                      # [B, 3, 3]
        M = R @ np.diag(1.0 / semi ** 2) @ R.transpose(0, 2, 1)                          # view-space ellipsoid
        m = lambda i, j: M[:, i, j][:, None, None]                                       # noqa: E731
        Sxx, Sxy, Syy = (m(0, 0) - m(0, 2) ** 2 / m(2, 2), m(0, 1) - m(0, 2) * m(1, 2) / m(2, 2),
                         m(1, 1) - m(1, 2) ** 2 / m(2, 2))                               # silhouette (Schur)
        f = Sxx * qx * qx + 2 * Sxy * qx * qy + Syy * qy * qy - 1.0
        grad = 2 * np.sqrt((Sxx * qx + Sxy * qy) ** 2 + (Sxy * qx + Syy * qy) ** 2) + 1e-6
        head = _cover(f / grad, fpx)
        # torso and neck (image plane, follow the head a little), long hair behind the head, ears
        shirt = np.asarray(I.shirt, np.float32)
        _paint(img, _ellipse(X[None], Y[None], dx + 0.3 * dx, dy * 0.3 + 1.3 * zoom ** 0.5, 0.8 * zoom, 0.55 * zoom, px),
               shirt)
        _paint(img, _cover(np.maximum(np.abs(qx) - 0.15, np.maximum(0.2 - qy, qy - 1.6)), fpx), np.asarray(I.skin) * 0.78)
        if I.hair_style == "long":
            _paint(img, _ellipse(qx, qy, 0.0, 0.12, I.face_rx * 1.25, I.face_ry * 1.15, fpx) * _cover(qy - 0.75, fpx), I.hair)
        for side in (-1, 1):
            ear = R @ np.array([side * I.face_rx * 0.97, 0.02, -0.15 * identity.depth], np.float32)   # [B, 3]
            ex, ey = ear[:, 0][:, None, None], ear[:, 1][:, None, None]
            width = 0.07 * np.clip(np.abs(np.cos(yaw + side * 1.2)), 0.3, 1.0)
            _paint(img, _ellipse(qx, qy, ex, ey, width, 0.11, fpx), np.asarray(I.skin) * 0.88)
        # ray-cast the head: front hit point z, head coordinates p = R^T (qx, qy, z)
        bz = m(2, 2)
        az_ = m(0, 2) * qx + m(1, 2) * qy
        z = (-az_ + np.sqrt(np.maximum(-bz * f, 0.0))) / bz                              # discriminant = -M_zz f
        Rt = R.transpose(0, 2, 1)
        r = lambda i, j: Rt[:, i, j][:, None, None]                                      # noqa: E731
        pxh, pyh, pzh = (r(i, 0) * qx + r(i, 1) * qy + r(i, 2) * z for i in range(3))
        face = _draw_face_texture(identity, pxh, pyh, mouth[sl], blink[sl], fpx, noise)
        if I.hair_style != "bald":                                                       # the back of the head
            _paint(face, _cover(pzh / semi[2] + 0.15, 0.05), I.hair)
        n = np.einsum("bhwj,bij->bhwi", np.stack([pxh / semi[0] ** 2, pyh / semi[1] ** 2, pzh / semi[2] ** 2], -1),
                      R)                                                                 # view-space normal
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-9
        lambert = np.clip((n * L[:, None, None, :]).sum(-1), 0, 1)
        face *= (0.5 + 0.6 * lambert)[..., None]
        _paint(img, head, 0.0)
        img += head[..., None] * face
        img *= tint
        img = img.reshape(-1, size, supersample, size, supersample, 3).mean(axis=(2, 4))
        out[sl] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out
