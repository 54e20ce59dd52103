"""Evaluation of real talking-head videos with the peers' metrics (SyncNet, ArcFace, FID, FVD, LPIPS, CIEDE2000).

Every model loads from a local weights folder (:mod:`.weights`, docs/evaluation.md); ``scripts/evaluate.py`` is the
command line, :func:`evaluate_videos` the Python entry point.  The synthetic world's own metrics stay in
:mod:`avatarforcing.metrics`.
"""
from .runner import Evaluator, evaluate_videos, markdown_table

__all__ = ["Evaluator", "evaluate_videos", "markdown_table"]
