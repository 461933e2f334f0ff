"""Evaluation of co-saliency maps: MAE, max/mean F, max/mean E, S-measure, IoU and HCE, overall and per group.

The measures come from the reference implementation, ``py_sod_metrics`` (PySODMetrics), behind one
accumulator, :class:`CoSODEvaluator`. Its conventions (see ``method_spec.md`` section D):

- Inputs are ``HxW uint8`` maps in 0..255 (or bool). A prediction of another size is resized to the ground
  truth size with PIL bilinear, as eval-co-sod does. The ground truth is binarised at ``> 128``.
- F- and E-measure curves have 256 thresholds (``P >= k/255`` on the min-max normalised prediction); the
  curves are averaged per image over the whole dataset, then max and mean are taken of the averaged curve.
  The F-measure uses beta^2 = 0.3 (PySODMetrics' ``beta`` argument is beta^2).
- S-measure with alpha = 0.5; HCE with PySODMetrics' defaults (relax 5, epsilon 2.0) on the prediction
  binarised at 0.5 after min-max normalisation.
- MAE is taken on the raw prediction ``P/255`` (no min-max normalisation), as eval-co-sod does; pass
  ``normalize_mae=True`` for PySODMetrics' default (normalised prediction).
- IoU binarises the raw prediction at ``>= 128``.
- Every average is per image: the overall numbers are a mean over all images, not a mean of group means.

Known differences from eval-co-sod: 256 instead of 255 thresholds, the S-measure centroid (+1), and the eps
(``np.spacing(1)`` instead of 1e-20). For near-binary maps they are usually below 1e-3.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from py_sod_metrics import MAE, Emeasure, Fmeasure, HumanCorrectionEffortMeasure, Smeasure

log = logging.getLogger(__name__)

METRIC_KEYS = ("mae", "max_f", "mean_f", "max_e", "mean_e", "s_measure", "iou", "hce")
F_BETA2 = 0.3
S_ALPHA = 0.5


def _as_map(arr: object, what: str) -> np.ndarray:
    """Validate an ``HxW`` uint8 (0..255) or bool map and return it as uint8 (bool -> 0/255)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(arr).__name__}")
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty 2-D HxW map, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise TypeError(
            f"{what} must be uint8 in 0..255 or bool, got dtype {arr.dtype}; convert a float map in [0, 1] "
            "with (p * 255).round().astype(np.uint8)"
        )
    return arr


def iou(pred_bool: np.ndarray, gt_bool: np.ndarray, *, empty: float = 1.0) -> float:
    """Intersection over union of two ``HxW bool`` masks, in [0, 1]; the one IoU of the project.

    Two empty masks give ``empty``: 1.0 by default (they agree perfectly, as a score against ground truth);
    the mask-discovery and pseudo-label steps pass 0.0 (an empty proposal overlaps nothing).
    """
    for what, arr in (("pred_bool", pred_bool), ("gt_bool", gt_bool)):
        if not isinstance(arr, np.ndarray) or arr.dtype != bool:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise TypeError(f"{what} must be a numpy bool array, got {got}")
    if pred_bool.shape != gt_bool.shape:
        raise ValueError(f"shape mismatch: pred_bool {pred_bool.shape} vs gt_bool {gt_bool.shape}")
    union = np.count_nonzero(pred_bool | gt_bool)
    if union == 0:
        return float(empty)
    return float(np.count_nonzero(pred_bool & gt_bool) / union)


class CoSODEvaluator:
    """Accumulates the measures over (prediction, ground truth) pairs; read them with :meth:`results`.

    ``normalize_mae``: False (default) takes MAE on the raw prediction as eval-co-sod does; True uses
    PySODMetrics' min-max normalised prediction.
    """

    def __init__(self, *, normalize_mae: bool = False):
        if not isinstance(normalize_mae, bool):
            raise TypeError(f"normalize_mae must be a bool, got {normalize_mae!r}")
        self.normalize_mae = normalize_mae
        self._mae = MAE()
        with warnings.catch_warnings():  # Fmeasure warns that FmeasureV2 will replace it; same numbers
            warnings.filterwarnings("ignore", message="This class will be removed")
            self._fm = Fmeasure(beta=F_BETA2)
        self._em = Emeasure()
        self._sm = Smeasure(alpha=S_ALPHA)
        self._hce = HumanCorrectionEffortMeasure()
        self._ious: list[float] = []
        self._groups: list[str | None] = []
        self._names: list[str | None] = []
        self._seen: set[tuple[str | None, str]] = set()

    def __len__(self) -> int:
        return len(self._ious)

    @property
    def n_images(self) -> int:
        """How many images were added so far."""
        return len(self._ious)

    def step(
        self, pred: np.ndarray, gt: np.ndarray, *, group: str | None = None, name: str | None = None
    ) -> None:
        """Add one image.

        ``pred``: ``HxW uint8`` 0..255 (soft or binary map) or bool, resized to the size of ``gt`` with PIL
        bilinear if it differs. ``gt``: ``HxW uint8`` 0..255 or bool (foreground ``> 128``). ``group``: the
        image's group for per-group results (None: counted only in the overall numbers). ``name``: an id
        used to refuse the same image twice within a group.
        """
        for what, value in (("group", group), ("name", name)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what} must be a str or None, got {type(value).__name__} {value!r}")
        pred = _as_map(pred, "pred")
        gt = _as_map(gt, "gt")
        if name is not None:
            if (group, name) in self._seen:
                raise ValueError(f"image {name!r} of group {group!r} was already evaluated")
            self._seen.add((group, name))
        if pred.shape != gt.shape:
            log.debug("resizing prediction %s from %s to %s", name, pred.shape, gt.shape)
            size = (gt.shape[1], gt.shape[0])
            pred = np.asarray(Image.fromarray(pred).resize(size, Image.Resampling.BILINEAR))
        if self.normalize_mae:
            self._mae.step(pred, gt)
        else:
            self._mae.step(pred.astype(np.float64) / 255.0, gt > 128, normalize=False)
        self._fm.step(pred, gt)
        self._em.step(pred, gt)
        self._sm.step(pred, gt)
        self._hce.step(pred, gt)
        self._ious.append(iou(pred >= 128, gt > 128))
        self._groups.append(group)
        self._names.append(name)

    def _summary(self, idx: np.ndarray) -> dict[str, float]:
        """Per-image means over the images ``idx`` (the same reductions as the reference ``get_results``)."""
        f_curve = np.mean(np.asarray(self._fm.changeable_fms, dtype=np.float64)[idx], axis=0)
        e_curve = np.mean(np.asarray(self._em.changeable_ems, dtype=np.float64)[idx], axis=0)
        return {
            "mae": float(np.mean(np.asarray(self._mae.maes, dtype=np.float64)[idx])),
            "max_f": float(f_curve.max()),
            "mean_f": float(f_curve.mean()),
            "max_e": float(e_curve.max()),
            "mean_e": float(e_curve.mean()),
            "s_measure": float(np.mean(np.asarray(self._sm.sms, dtype=np.float64)[idx])),
            "iou": float(np.mean(np.asarray(self._ious)[idx])),
            "hce": float(np.mean(np.asarray(self._hce.hces, dtype=np.float64)[idx])),
        }

    def per_image(self) -> list[dict]:
        """Each image's own measures, in the order added: ``[{"group", "name", METRIC_KEYS...}]``. For max and
        mean F / E they are the maximum and mean of the image's own curve (their mean over images equals the
        overall mean F / E, not the overall max F / E, which is the maximum of the averaged curve)."""
        if not self._ious:
            return []
        fms = np.asarray(self._fm.changeable_fms, dtype=np.float64)
        ems = np.asarray(self._em.changeable_ems, dtype=np.float64)
        columns = {
            "mae": np.asarray(self._mae.maes, dtype=np.float64),
            "max_f": fms.max(axis=1),
            "mean_f": fms.mean(axis=1),
            "max_e": ems.max(axis=1),
            "mean_e": ems.mean(axis=1),
            "s_measure": np.asarray(self._sm.sms, dtype=np.float64),
            "iou": np.asarray(self._ious, dtype=np.float64),
            "hce": np.asarray(self._hce.hces, dtype=np.float64),
        }
        return [
            {"group": g, "name": n, **{k: float(columns[k][i]) for k in METRIC_KEYS}}
            for i, (g, n) in enumerate(zip(self._groups, self._names, strict=True))
        ]

    def results(self) -> dict:
        """All measures as JSON-serialisable Python floats.

        Returns ``{"n_images", "n_groups", "overall": {METRIC_KEYS...}, "groups": {name: {"n_images",
        METRIC_KEYS...}}, "pr_curve": {"thresholds", "precision", "recall"}}``. The PR curve is the mean over
        images of the 256-point curve, ordered as PySODMetrics gives it: entry ``k`` is threshold ``255 - k``.
        Raises ValueError when no image was added.
        """
        if not self._ious:
            raise ValueError("no images were evaluated: call step(pred, gt) at least once before results()")
        fm = self._fm.get_results()
        em = self._em.get_results()
        overall = {
            "mae": float(self._mae.get_results()["mae"]),
            "max_f": float(fm["fm"]["curve"].max()),
            "mean_f": float(fm["fm"]["curve"].mean()),
            "max_e": float(em["em"]["curve"].max()),
            "mean_e": float(em["em"]["curve"].mean()),
            "s_measure": float(self._sm.get_results()["sm"]),
            "iou": float(np.mean(self._ious)),
            "hce": float(self._hce.get_results()["hce"]),
        }
        groups: dict[str, dict] = {}
        group_arr = np.array([g if g is not None else "" for g in self._groups], dtype=object)
        has_group = np.array([g is not None for g in self._groups])
        for name in sorted({g for g in self._groups if g is not None}):
            idx = np.flatnonzero(has_group & (group_arr == name))
            groups[name] = {"n_images": int(idx.size), **self._summary(idx)}
        return {
            "n_images": len(self._ious),
            "n_groups": len(groups),
            "overall": overall,
            "groups": groups,
            "pr_curve": {
                "thresholds": list(range(255, -1, -1)),
                "precision": [float(v) for v in fm["pr"]["p"]],
                "recall": [float(v) for v in fm["pr"]["r"]],
            },
        }


def _check_results(results: object) -> dict:
    if not isinstance(results, dict):
        raise TypeError(f"results must be the dict of CoSODEvaluator.results(), got {type(results).__name__}")
    missing = [k for k in ("n_images", "overall", "groups", "pr_curve") if k not in results]
    if missing:
        raise ValueError(f"results lacks the keys {missing}; it has {sorted(results)}")
    return results


def format_table(results: dict) -> str:
    """A plain-text table: one row for the whole dataset, then one per group, one column per measure."""
    results = _check_results(results)
    header = ["scope", "images", *METRIC_KEYS]
    rows = [["overall", str(results["n_images"])] + [f"{results['overall'][k]:.4f}" for k in METRIC_KEYS]]
    for name, res in results["groups"].items():
        rows.append([name, str(res["n_images"])] + [f"{res[k]:.4f}" for k in METRIC_KEYS])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        cells = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([row[0].ljust(widths[0]), *cells])

    lines = [fmt(r) for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    if results["groups"]:
        lines.insert(3, "-" * len(lines[0]))
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.txt`` (:func:`format_table`) and ``pr_curve.png`` into ``out_dir``.

    Returns ``{"json": path, "txt": path, "png": path}``. The plot uses matplotlib's Agg canvas directly (no
    pyplot, no global backend switch), imported only here.
    """
    results = _check_results(results)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "txt": out / "metrics.txt", "png": out / "pr_curve.png"}
    try:
        text = json.dumps(results, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"results are not JSON-serialisable with finite numbers: {exc}") from exc
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["txt"].write_text(format_table(results), encoding="utf-8")

    fig = Figure(figsize=(5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pr = results["pr_curve"]
    ax.plot(pr["recall"], pr["precision"], lw=2, label=f"max F = {results['overall']['max_f']:.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"precision-recall ({results['n_images']} images)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.savefig(paths["png"])
    log.info("wrote evaluation report to %s", out)
    return paths
