"""Evaluation of real videos (avatarforcing/evaluation, scripts/evaluate.py): weights layouts, known answers, errors.

Every model runs with random weights in the real files' key layouts (avatarforcing/evaluation/random_weights.py);
no file is downloaded.  The ONNX stand-ins need onnxruntime + onnx (pip install -e ".[eval]" plus onnx).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.evaluation import faces, fid, i3d, syncnet, video_metrics
from avatarforcing.evaluation.arcface import ARCFACE_TEMPLATE, decode_scrfd, similarity_transform, warp_affine
from avatarforcing.evaluation.inception import FIDInceptionV3, InceptionFeatures
from avatarforcing.evaluation.lpips import AdjacentLPIPS, AlexNetTrunk, LPIPSHead
from avatarforcing.evaluation.random_weights import write_random_weights
from avatarforcing.evaluation.runner import check_metrics, match
from avatarforcing.evaluation.weights import WEIGHT_FILES, WeightsFolder
from avatarforcing.media import VideoWriter, write_wav
from avatarforcing.metrics import feature_stats, frechet_distance
from helpers import load_script

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="the ArcFace / SCRFD stand-ins need onnx + onnxruntime "
                                                      "(pip install -e '.[eval]' onnx)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> WeightsFolder:
    folder = tmp_path_factory.mktemp("eval_weights")
    keys = [k for k in WEIGHT_FILES if HAS_ONNX or k not in ("arcface", "scrfd")]
    return WeightsFolder(write_random_weights(folder, keys, small=True))


def _face_frames(T: int, H: int = 96, W: int = 128, tint: int = 0, seed: int = 0) -> np.ndarray:
    """A bright ellipse that moves a little on a grey background -> uint8 [T, H, W, 3]."""
    yy, xx = np.mgrid[:H, :W]
    out = np.full((T, H, W, 3), 60, np.uint8)
    for t in range(T):
        inside = (yy - H / 2) ** 2 / (0.3 * H) ** 2 + (xx - W / 2 - 3 * np.sin(t / 3 + seed)) ** 2 / (0.2 * W) ** 2 < 1
        out[t][inside] = (200, 150 + tint, 120)
    return out


def _write_video(path: Path, frames: np.ndarray, audio: Path | None = None) -> Path:
    with VideoWriter(path, 25, audio) as w:
        w.write(frames)
    return path


def _load_cli():
    return load_script("evaluate", "evaluate_cli").main


@pytest.fixture
def run(capsys):
    """scripts/evaluate.py's main() in this process -> (exit status, stdout, stderr)."""
    main = _load_cli()

    def call(*args):
        rc = main(["--no-progress", *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out, err
    return call


def _one_line_error(result) -> str:
    rc, out, err = result
    assert rc == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# weights: real layouts, missing and mismatched files


def test_modules_have_the_real_key_layouts():
    """Keys and shapes of the released files (syncnet_v2.model, sfd_face.pth, pt_inception, alexnet, lpips v0.1)."""
    expected = {
        syncnet.SyncNet(): {"netcnnaud.0.weight": (64, 1, 3, 3), "netcnnaud.18.weight": (512, 256, 5, 4),
                            "netcnnlip.0.weight": (96, 3, 5, 7, 7), "netcnnlip.18.weight": (512, 256, 1, 6, 6),
                            "netfcaud.0.weight": (512, 512), "netfclip.3.weight": (1024, 512)},
        faces.S3FDNet(): {"vgg.0.weight": (64, 3, 3, 3), "vgg.28.weight": (512, 512, 3, 3),
                          "vgg.31.weight": (1024, 512, 3, 3), "vgg.33.weight": (1024, 1024, 1, 1),
                          "L2Norm3_3.weight": (256,), "extras.3.weight": (256, 128, 3, 3),
                          "conf.0.weight": (4, 256, 3, 3), "loc.3.weight": (4, 1024, 3, 3)},
        FIDInceptionV3(): {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                           "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                           "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048)},
        AlexNetTrunk(): {"features.0.weight": (64, 3, 11, 11), "features.10.weight": (256, 256, 3, 3)},
        LPIPSHead(): {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))},
    }
    for module, keys in expected.items():
        state = module.state_dict()
        for key, shape in keys.items():
            assert tuple(state[key].shape) == shape, (type(module).__name__, key)
    assert sum(v.numel() for v in FIDInceptionV3().state_dict().values() if v.dtype.is_floating_point) > 23.8e6


def test_missing_weights_name_the_file_and_the_download(tmp_path, run):
    folder = WeightsFolder(tmp_path)
    with pytest.raises(AvatarForcingError) as info:
        folder.check(["syncnet", "i3d"])
    msg = str(info.value)
    assert "\n" not in msg and "syncnet_v2.model" in msg and "i3d_torchscript.pt" in msg
    assert "wget http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model" in msg
    videos = tmp_path / "videos"
    _write_video(videos / "a.mp4", _face_frames(8))
    line = _one_line_error(run("--generated", videos, "--metrics", "adj_lpips", "--weights", tmp_path))
    assert "alexnet-owt-7be5be79.pth" in line and "lpips_alex_v0.1.pth" in line and "download" in line


def test_mismatched_weights_are_one_line_errors(tmp_path):
    folder = WeightsFolder(tmp_path)
    torch.save(syncnet.SyncNet(embed_dim=512).state_dict(), folder.path("syncnet"))
    with pytest.raises(AvatarForcingError, match=r"syncnet_v2.model: does not match.*netfcaud.3.weight.*download"):
        syncnet.SyncScorer.load(folder)
    folder.path("i3d").write_bytes(b"not torchscript")
    with pytest.raises(AvatarForcingError, match=r"i3d_torchscript.pt: is not a TorchScript module.*dropbox"):
        i3d.I3DFeatures.load(folder)
    folder.path("inception").write_bytes(b"garbage")
    with pytest.raises(AvatarForcingError, match="cannot be read as a torch weights file"):
        InceptionFeatures.load(folder)


def test_random_weights_load_and_run(weights):
    crops = _face_frames(7, 224, 224)
    scorer = syncnet.SyncScorer.load(weights)
    lip, aud = scorer.embeddings(crops, np.zeros(7 * 640, np.float32))
    assert lip.shape == aud.shape == (2, 1024)
    assert InceptionFeatures.load(weights)(crops[:2]).shape == (2, 2048)
    assert i3d.I3DFeatures.load(weights)(crops[:1].repeat(33, 0)).shape == (2, 400)
    lp = AdjacentLPIPS.load(weights)(crops[:3])
    assert lp.shape == (2,) and np.isfinite(lp).all()
    dets = faces.S3FD.load(weights).detect(_face_frames(2, 128, 128))
    assert len(dets) == 2 and all(d.shape[1:] == (5,) for d in dets)


@needs_onnx
def test_arcface_stand_ins_load_and_embed(weights):
    from avatarforcing.evaluation.arcface import IdentityEmbedder
    embed = IdentityEmbedder.load(weights)
    emb = embed(_face_frames(3, 128, 160))
    assert emb.shape == (3, 512)
    aligned = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    assert embed.recognizer(aligned).shape == (2, 512)


# ----------------------------------------------------------------------------------------------
# known answers


def test_mfcc_frames_and_energy():
    """python_speech_features' framing (1 + ceil((N - 400) / 160) frames) and c0 = log frame energy."""
    tone = 1000 * np.sin(2 * np.pi * 400 * np.arange(16000) / 16000)
    feat = syncnet.mfcc(tone)
    assert feat.shape == (1 + int(np.ceil((16000 - 400) / 160)), 13)
    louder = syncnet.mfcc(2 * tone)
    assert np.allclose(louder[:, 0] - feat[:, 0], np.log(4))          # c0 = log energy ~ 2 log amplitude
    assert np.allclose(louder[:, 1:], feat[:, 1:])                     # a gain only moves the DCT's constant term


class SyncOracle:
    """An exact toy sync network: a lip window's embedding is the centre frame's grey level u, an audio window's
    the u recovered from the log energy of its centre frame's first 25 ms (amplitude = A0 * exp(u))."""

    def __init__(self, c0_ref: float):
        self.c0_ref = c0_ref

    @staticmethod
    def _embed(u):
        return torch.cat([10 * u[:, None], torch.zeros(len(u), 7)], 1)

    def forward_lip(self, x):                        # [N, 3, 5, 224, 224]
        return self._embed((x[:, :, 2].mean((1, 2, 3)) - 40) / 170)

    def forward_aud(self, x):                        # [N, 1, 13, 20]: column 8 = first MFCC frame of window frame 2
        return self._embed((x[:, 0, 0, 8] - self.c0_ref) / 2)


@pytest.mark.parametrize("shift", [3, -2])
def test_offset_search_recovers_a_known_audio_shift(shift):
    T, A0 = 100, 0.05
    u = np.random.default_rng(1).uniform(0, 1, T + 10)
    crops = np.stack([np.full((224, 224, 3), round(40 + 170 * u[t]), np.uint8) for t in range(T)])
    u = (np.round(40 + 170 * u) - 40) / 170                             # the grey levels actually written
    tone = np.sin(2 * np.pi * 400 * np.arange(640) / 16000)             # 400 Hz: whole periods per 25 ms frame
    wav = np.concatenate([A0 * np.exp(u[(t + shift) % len(u)]) * tone for t in range(T)])   # audio leads by shift
    c0_ref = syncnet.mfcc(syncnet.int16_scale(A0 * np.tile(tone, 4)))[1, 0]
    scorer = syncnet.SyncScorer(SyncOracle(c0_ref))
    lip, aud = scorer.embeddings(crops, wav)
    assert len(lip) == T - syncnet.WINDOW
    result = syncnet.offset_search(lip, aud, vshift=15)
    assert result["offset"] == shift
    assert result["conf"] > 10 * result["dist"]
    assert len(result["curve"]) == 31 and result["curve"].argmin() == 15 - shift


def test_offset_search_definitions():
    """Sync-D = min of the mean-distance curve, Sync-C = median - min, as syncnet_python."""
    video = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    result = syncnet.offset_search(video, video.clone(), vshift=1)
    curve = result["curve"]
    assert curve.argmin() == 1 and result["offset"] == 0
    assert result["dist"] == pytest.approx(curve.min()) and result["conf"] == pytest.approx(np.median(curve) - curve.min())


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_perturbation(weights):
    frames = np.stack([_face_frames(1, 96, 96, tint=5 * i, seed=i)[0] for i in range(6)])
    feats = InceptionFeatures.load(weights)(frames)
    scale = np.trace(np.cov(feats, rowvar=False))
    assert abs(fid.frechet_distance(feats, feature_stats(feats))) < 1e-6 * scale
    x = np.random.default_rng(0).standard_normal((40, 16))
    y = 1.5 * np.random.default_rng(1).standard_normal((60, 16)) + 0.3
    assert fid.frechet_distance(x, feature_stats(y)) == pytest.approx(frechet_distance(x, y), rel=1e-6)


def test_fvd_is_symmetric_and_grows_with_a_known_perturbation(weights):
    features = i3d.I3DFeatures.load(weights)
    rng = np.random.default_rng(0)
    base = np.concatenate([_face_frames(16, 64, 64, tint=3 * i, seed=i) for i in range(8)])
    noise = rng.standard_normal(base.shape)

    def perturbed(sigma):
        return np.clip(base + sigma * noise, 0, 255).astype(np.uint8)

    ref = features(base)
    assert ref.shape == (8, 400)
    fvd = [fid.frechet_distance(features(perturbed(s)), feature_stats(ref)) for s in (0, 8, 24, 64)]
    assert abs(fvd[0]) < 1e-6 * np.trace(np.cov(ref, rowvar=False))
    assert fvd[1] < fvd[2] < fvd[3]
    other = features(perturbed(24))
    assert fid.frechet_distance(other, feature_stats(ref)) == pytest.approx(
        fid.frechet_distance(ref, feature_stats(other)), rel=1e-6)


def test_weight_free_metrics_known_answers():
    frames = _face_frames(4, 64, 64)
    constant = np.repeat(frames[:1], 4, 0)
    assert np.all(video_metrics.colour_drift(constant, constant[0]) == 0)
    tinted = constant.copy()
    tinted[..., 1] = np.clip(tinted[..., 1].astype(int) + 30, 0, 255)
    assert np.all(video_metrics.colour_drift(tinted, constant[0]) > 1)
    assert np.allclose(video_metrics.psnr(frames, frames), 10 * np.log10(255 ** 2 / 1e-10))
    assert np.allclose(video_metrics.ssim(frames, frames), 1.0)
    shifted = np.clip(frames.astype(int) + 10, 0, 255).astype(np.uint8)
    assert np.all(video_metrics.psnr(frames, shifted) < 30)
    assert np.allclose(video_metrics.flicker(constant), 0) and video_metrics.flicker(frames).shape == (3,)


def test_s3fd_priors_decode_and_suppression():
    anchors = faces.priors((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1), (1, 1)])
    assert anchors.shape == (16 * 16 + 64 + 16 + 4 + 1 + 1, 4)
    assert torch.allclose(anchors[0], torch.tensor([2 / 64, 2 / 64, 16 / 64, 16 / 64]))    # (cx, cy, w, h)
    boxes = faces.decode(torch.zeros(1, 4), anchors[:1])
    assert torch.allclose(boxes, torch.tensor([[-6 / 64, -6 / 64, 10 / 64, 10 / 64]]))
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], np.float64)
    dets = faces.select(boxes, np.array([0.95, 0.99, 0.97, 0.5]), conf_th=0.9)
    assert dets[:, 4].tolist() == [0.99, 0.97]


def test_face_track_and_crop_window():
    """syncnet_python's crop: window [y - s, y + 2.8 s) x [x - 1.4 s, x + 1.4 s) around the smoothed box."""
    T = 15
    dets = [np.array([[40.0, 30.0, 60.0, 50.0, 0.99]]) if t != 7 else np.zeros((0, 5)) for t in range(T)]
    boxes, fraction = faces.track(dets)
    assert fraction == pytest.approx(14 / 15)
    assert np.allclose(boxes[6:9], [50, 40, 10])               # interpolated gap; edges shrink (medfilt zero-pads)
    frame = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    crop = faces.track_crops(frame[None], np.array([[50.0, 40.0, 10.0]]), size=28)[0]
    assert np.array_equal(crop, frame[30:58, 36:64])           # rows y - s .. y + 1.8 s, cols x -/+ 1.4 s
    edge = faces.track_crops(frame[None], np.array([[5.0, 5.0, 10.0]]), size=28)[0]
    assert np.all(edge[:5] == 110) and np.array_equal(edge[5:, 9:], frame[:23, :19])   # outside: grey 110
    assert faces.track([np.zeros((0, 5))] * 3) is None
    single, _ = faces.track([np.array([[40.0, 30.0, 60.0, 50.0, 0.99]])])       # a reference image: no smoothing
    assert np.allclose(single, [[50, 40, 10]])
    assert faces.centre_crops(np.zeros((2, 50, 80, 3), np.uint8)).shape == (2, 224, 224, 3)


def test_scrfd_decoding_and_alignment():
    outputs = []
    for kind, k in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            outputs.append(np.zeros(((64 // s) ** 2 * 2, k), np.float32))
    outputs[1][2 * (1 * 4 + 2) + 1] = 0.9                       # stride 16, row 1, col 2, second anchor
    outputs[4][2 * (1 * 4 + 2) + 1] = [1, 1, 2, 2]
    outputs[7][2 * (1 * 4 + 2) + 1] = np.arange(10) / 16
    scores, boxes, kps = decode_scrfd(outputs, 64, 64)
    assert scores.tolist() == [pytest.approx(0.9)]
    assert boxes[0].tolist() == [16, 0, 64, 48]                 # centre (32, 16) -/+ (1, 1, 2, 2) * 16
    assert np.allclose(kps[0], np.array([32, 16]) + np.arange(10).reshape(5, 2))
    src = ARCFACE_TEMPLATE * 2 + 5
    assert np.allclose(similarity_transform(src, ARCFACE_TEMPLATE), [[0.5, 0, -2.5], [0, 0.5, -2.5]])
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    assert np.array_equal(warp_affine(image, np.array([[1.0, 0, -3], [0, 1, -4]]), 20), image[4:24, 3:23])


# ----------------------------------------------------------------------------------------------
# the command line


def test_inputs_are_matched_by_name_or_line():
    gen = [Path("x/b.mp4"), Path("x/a.mp4")]
    assert match(gen, [Path("r/a.png"), Path("r/b.png")], "reference", False) == [Path("r/b.png"), Path("r/a.png")]
    assert match(gen, [Path("r/1.png"), Path("r/2.png")], "reference", True) == [Path("r/1.png"), Path("r/2.png")]
    with pytest.raises(AvatarForcingError, match="no reference named b"):
        match(gen, [Path("r/1.png"), Path("r/2.png")], "reference", False)
    with pytest.raises(AvatarForcingError, match="needs real videos; pass --ground-truth"):
        check_metrics(["fid"], "w", "r", None)
    with pytest.raises(AvatarForcingError, match="needs model weights"):
        check_metrics(["sync"], None, None, None)
    assert check_metrics(None, None, "r", None) == ("delta_e", "flicker")


def test_weight_free_cli_and_corrupt_video(tmp_path, run):
    for d in ("gen", "gt", "ref"):
        (tmp_path / d).mkdir()
    frames = _face_frames(30, 64, 96)
    _write_video(tmp_path / "gen" / "a.mp4", frames)
    _write_video(tmp_path / "gt" / "a.mp4", frames[::-1])
    from PIL import Image
    Image.fromarray(frames[0]).save(tmp_path / "ref" / "a.png")
    out = tmp_path / "res" / "results.json"
    rc, stdout, stderr = run("--generated", tmp_path / "gen", "--reference", tmp_path / "ref", "--ground-truth",
                             tmp_path / "gt", "--out", out, "--tail-seconds", 0.4)
    assert rc == 0, stderr
    res = json.loads(out.read_text())
    row = res["videos"]["a"]
    assert res["config"]["crop"] == "centre" and row["tail_frames"] == 10
    assert row["delta_e_total"] > 0 and row["delta_e_last"] > 0         # the face moves away from the reference
    assert row["psnr_total"] < 100 and 0 < row["ssim_total"] < 1 and row["flicker_total"] > 0
    assert "| a | 30 |" in out.with_suffix(".md").read_text() and "ΔE2000" in stdout
    (tmp_path / "gen" / "b.mp4").write_bytes(b"\x00\x01 not a video")
    line = _one_line_error(run("--generated", tmp_path / "gen", "--out", out))
    assert "b.mp4" in line


def test_full_cli_with_random_weights(weights, tmp_path, run):
    rng = np.random.default_rng(0)
    write_wav(tmp_path / "speech.wav", (0.1 * rng.standard_normal(36 * 640)).astype(np.float32), 16000)
    frames = _face_frames(34, 64, 96)
    _write_video(tmp_path / "gen" / "a.mp4", frames, tmp_path / "speech.wav")
    _write_video(tmp_path / "gt" / "a.mp4", _face_frames(34, 64, 96, tint=20))
    from PIL import Image
    (tmp_path / "ref").mkdir()
    Image.fromarray(frames[0]).save(tmp_path / "ref" / "a.png")
    metrics = "sync,fvd,adj_lpips,delta_e,psnr,flicker" + (",csim" if HAS_ONNX else "")
    out = tmp_path / "results.json"
    rc, _, stderr = run("--generated", tmp_path / "gen", "--reference", tmp_path / "ref", "--ground-truth",
                        tmp_path / "gt", "--weights", weights.folder, "--metrics", metrics, "--out", out,
                        "--device", "cpu", "--tail-seconds", 0.8)
    assert rc == 0, stderr
    res = json.loads(out.read_text())
    row, agg = res["videos"]["a"], res["aggregate"]
    assert res["config"]["crop"] == "s3fd" and row["tail_frames"] == 20
    for key in metrics.split(","):
        key = {"sync": "sync_c"}.get(key, key)
        assert row[f"{key}_total"] is not None and agg[f"{key}_total"] is not None, key
    assert abs(row["sync_offset_total"]) <= 15 and row["sync_d_total"] > 0
    assert row["fvd_last"] is None                             # a 20-frame tail holds one 16-frame clip: no covariance
    assert set(res["seconds"]) >= {"read", "crops", "sync", "fvd", "total"}
