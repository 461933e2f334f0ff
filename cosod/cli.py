"""`cosod`: predict, train, evaluate and manage weights from the command line.

Exit codes: 0 all went well; 1 the run finished but some inputs were skipped (each is reported); 2 a usage
error, a missing folder or missing weights (one line on stderr naming the problem).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import UsageError

log = logging.getLogger("cosod")

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default=os.environ.get("COSOD_BACKBONE", "vit_small_patch8_224.dino"),
        help="backbone name (see `cosod weights list`); env COSOD_BACKBONE",
    )
    p.add_argument("--weights-dir", default=None, help="folder of weight files; env COSOD_WEIGHTS_DIR")
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("COSOD_CACHE_DIR"),
        help="feature cache folder; env COSOD_CACHE_DIR",
    )
    p.add_argument("--device", default=os.environ.get("COSOD_DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    p.add_argument("--input-size", type=int, default=224)


def _model_names() -> list[str]:
    """The registered methods (``cosod.methods.METHODS``), for ``--model``."""
    from .methods import METHODS

    return list(METHODS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosod", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cosod {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="masks for folders of groups (a PNG per image)")
    p.add_argument("groups_dir", help="<dir>/<group>/<images> or the CoSOD layout <dir>/images/<group>/...")
    p.add_argument("--out", required=True, help="output folder: <out>/<group>/<stem>.png")
    _add_model_args(p)
    p.add_argument(
        "--model",
        default=os.environ.get("COSOD_MODEL", "scosparc"),
        choices=_model_names(),
        help=f"{' or '.join(_model_names())} (default scosparc); env COSOD_MODEL",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="SCoSPARC: stage-1 checkpoint (ours or the official format); UMS: required checkpoint",
    )
    p.add_argument("--max-refs", type=int, default=24, help="reference images per group (K)")
    p.add_argument(
        "--threshold",
        choices=["auto", "group", "map"],
        default="auto",
        help="auto: the model's own (group for SCoSPARC, per map for UMS)",
    )
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    p.add_argument("--no-refine", action="store_true", help="skip stage-2 region refinement")
    p.add_argument("--soft", action="store_true", help="also write the soft stage-1 maps as <stem>_soft.png")
    p.add_argument(
        "--binary",
        action="store_true",
        help="write 0/255 masks; default: the official output (the 224x224 mask resized with soft edges)",
    )
    p.add_argument(
        "--crf-workers",
        type=_workers,
        default=None,
        help="processes for a group's CRFs (default: the CPUs, at most 8; 1: none); the masks do not change",
    )
    d = p.add_argument_group(
        "deliberate differences from the official SCoSPARC code (README: Faithful by default)"
    )
    d.add_argument("--feature-precision", choices=["float32", "float16"], default="float32")
    d.add_argument("--backbone-amp", action="store_true", help="bf16 autocast for the backbone on CUDA")
    d.add_argument("--refine-fallback", choices=["official", "best"], default="official")
    d.add_argument("--crf-aspect", choices=["squash", "keep"], default="squash")
    d.add_argument("--crf-uniform", choices=["official", "keep"], default="official")

    p = sub.add_parser("train", help="self-supervised stage-1 training on folders of groups (no labels)")
    p.add_argument("data_root", help="CoSOD layout <root>/images/<group>/* (gt is not used)")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    _add_model_args(p)
    p.add_argument("--model", default="scosparc", choices=_model_names())
    p.add_argument(
        "--v2-backbone", default="vit_base_patch14_reg4_dinov2.lvd142m", help="UMS: DINOv2 backbone"
    )
    p.add_argument("--epochs", type=int, default=None, help="default: 150 (SCoSPARC) or 100 (UMS)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--init", choices=["seeded", "identity"], default="seeded")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--decoder-width", type=int, default=64, help="UMS decoder channels")

    p = sub.add_parser(
        "pseudo-label", help="CM-SPLG pseudo-labels for folders of groups (UMS training targets)"
    )
    p.add_argument("groups_dir", help="<dir>/<group>/<images> or the CoSOD layout <dir>/images/<group>/...")
    p.add_argument("--out", required=True, help="writes <out>/gt/<group>/<stem>.png (the CoSOD layout)")
    _add_model_args(p)
    p.add_argument("--no-crf", action="store_true", help="do not snap the masks to image edges")

    p = sub.add_parser("eval", help="score predicted masks against ground truth")
    p.add_argument("--pred", required=True, help="<pred>/<group>/<stem>.png")
    p.add_argument("--gt", required=True, help="<gt>/<group>/<stem>.png, or a CoSOD root holding gt/")
    p.add_argument("--out", default=None, help="report folder (default: <pred>/report)")

    p = sub.add_parser("weights", help="list or fetch backbone weight files")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    w = wsub.add_parser("list", help="known backbones and whether their file is present")
    w.add_argument("--weights-dir", default=None)
    w = wsub.add_parser("fetch", help="download through the timm hub and save into the weights folder")
    w.add_argument("name")
    w.add_argument("--weights-dir", default=None)
    w.add_argument("--if-missing", action="store_true", help="do nothing when the file is already there")
    w.add_argument(
        "--offline-ok",
        action="store_true",
        help="when the hub cannot be reached (and the file is not in the local Hugging Face cache), print "
        "one notice naming the file to put in place and exit 0; other failures still exit 1",
    )
    return parser


def _workers(text: str) -> int:
    """argparse type: a process count of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _require_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what} not found: {p}")
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import load_groups
    from .features import image_hash
    from .imageio import read_images, write_mask
    from .methods import get_method
    from .pipeline import Pipeline, PipelineConfig

    root = _require_dir(args.groups_dir, "groups folder")
    groups = load_groups(root)
    field = get_method(args.model).checkpoint_field
    if args.checkpoint and field is None:
        raise UsageError(f"model {args.model!r} takes no --checkpoint")
    config = PipelineConfig(
        model=args.model,
        backbone=args.backbone,
        input_size=args.input_size,
        max_refs=args.max_refs,
        **({field: args.checkpoint} if field else {}),
        threshold=args.threshold,
        crf=not args.no_crf,
        refine=not args.no_refine,
        feature_precision=args.feature_precision,
        backbone_amp=args.backbone_amp,
        refine_fallback=args.refine_fallback,
        crf_aspect=args.crf_aspect,
        crf_uniform=args.crf_uniform,
    )
    pipe = Pipeline.build(
        config,
        weights_dir=args.weights_dir,
        cache_dir=args.cache_dir,
        device=args.device,
        crf_workers=args.crf_workers,
    )
    out = Path(args.out)
    failed: list[str] = []
    written = 0
    total = sum(len(g.images) for g in groups)
    with tqdm(total=total, desc="predicting", unit="img", disable=not sys.stderr.isatty()) as bar:
        for group in groups:
            images, paths, bad = read_images(group.images)
            failed.extend(bad)
            bar.update(len(bad))
            if not images:
                continue
            pred = pipe.predict_group(images, hashes=[image_hash(im) for im in images])
            for path, mask, mask_map, soft in zip(paths, pred.masks, pred.mask_maps, pred.soft, strict=True):
                write_mask(out / group.name / f"{path.stem}.png", mask if args.binary else mask_map)
                if args.soft:
                    write_mask(
                        out / group.name / f"{path.stem}_soft.png", (soft * 255.0 + 0.5).astype("uint8")
                    )
                written += 1
            bar.update(len(images))
    log.info("wrote %d masks to %s", written, out)
    if failed:
        print(f"cosod predict: {len(failed)} image(s) could not be read and were skipped", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_groups
    from .train import TrainConfig, train

    root = _require_dir(args.data_root, "training data folder")
    groups = load_groups(root)
    config = TrainConfig(
        model=args.model,
        v2_backbone=args.v2_backbone,
        decoder_width=args.decoder_width,
        backbone=args.backbone,
        input_size=args.input_size,
        epochs=args.epochs,
        max_steps=args.steps,
        lr=args.lr,
        init=args.init,
        seed=args.seed,
    )
    cache_dir = args.cache_dir or str(Path(args.out).with_suffix("")) + ".features"
    ckpt = train(
        groups,
        config,
        out=args.out,
        cache_dir=cache_dir,
        weights_dir=args.weights_dir,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    m = ckpt.metrics
    losses = m["epoch_loss"] or [float("nan")]
    print(
        f"trained {m['steps']} steps on {m['n_groups']} groups / {m['n_images']} images; "
        f"last epoch's mean loss {losses[-1]:.4f}; checkpoint {args.out}"
    )
    return EXIT_PARTIAL if m["skipped_images"] else EXIT_OK


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .backbones import build_backbone
    from .data import load_groups
    from .features import FeatureCache, encode_images
    from .imageio import read_images, write_mask
    from .pseudo_labels import pseudo_label_masks

    root = _require_dir(args.groups_dir, "groups folder")
    groups = load_groups(root)
    backbone = build_backbone(
        args.backbone, weights_dir=args.weights_dir, device=args.device, input_size=args.input_size
    )
    cache = FeatureCache(args.cache_dir) if args.cache_dir else None
    out = Path(args.out) / "gt"
    failed: list[str] = []
    total = sum(len(g.images) for g in groups)
    with tqdm(total=total, desc="pseudo-labels", unit="img", disable=not sys.stderr.isatty()) as bar:
        for group in groups:
            images, paths, bad = read_images(group.images)
            failed.extend(bad)
            if images:
                feats = encode_images(backbone, images, cache=cache)
                masks, labels = pseudo_label_masks(images, feats, crf=not args.no_crf)
                for path, mask, lab in zip(paths, masks, labels, strict=True):
                    write_mask(out / group.name / f"{path.stem}.png", mask)
                    log.debug(
                        "%s/%s: %s (f=%d, overlap %.2f)",
                        group.name,
                        path.stem,
                        lab.source,
                        lab.frequency,
                        lab.overlap,
                    )
            bar.update(len(group.images))
    log.info("pseudo-labels written to %s", out)
    if failed:
        print(
            f"cosod pseudo-label: {len(failed)} image(s) could not be read and were skipped", file=sys.stderr
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _gt_root(path: Path) -> Path:
    return path / "gt" if (path / "gt").is_dir() else path


def cmd_eval(args: argparse.Namespace) -> int:
    from .errors import ImageReadError
    from .imageio import read_mask
    from .metrics import CoSODEvaluator, format_table, write_report

    pred_root = _require_dir(args.pred, "prediction folder")
    gt_root = _gt_root(_require_dir(args.gt, "ground-truth folder"))
    evaluator = CoSODEvaluator()
    missing: list[str] = []
    for gt_path in sorted(gt_root.glob("*/*.png")):
        group = gt_path.parent.name
        pred_path = pred_root / group / gt_path.name
        if not pred_path.is_file():
            missing.append(f"{group}/{gt_path.name}")
            continue
        try:
            evaluator.step(read_mask(pred_path), read_mask(gt_path), group=group, name=gt_path.stem)
        except ImageReadError as exc:
            log.error("skipped: %s", exc)
            missing.append(f"{group}/{gt_path.name}")
    if evaluator.n_images == 0:
        raise UsageError(f"no prediction in {pred_root} matches a ground-truth mask in {gt_root}")
    results = evaluator.results()
    results["missing_predictions"] = missing
    files = write_report(results, Path(args.out) if args.out else pred_root / "report")
    print(format_table(results))
    print("report: " + ", ".join(str(p) for p in files.values()))
    if missing:
        # eval-co-sod skips missing files silently, which inflates scores; we say so.
        print(f"cosod eval: {len(missing)} ground-truth mask(s) have no readable prediction", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _network_error(exc: BaseException) -> bool:
    """Whether a failed download failed for want of the network: the hub unreachable and the file not in
    the local cache (``huggingface_hub`` says so with LocalEntryNotFoundError), or the connection itself."""
    from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled

    network: list[type[BaseException]] = [
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
    ]
    for module, name in (
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    ):
        try:  # huggingface_hub 1.x downloads with httpx, older releases with requests
            network.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return isinstance(exc, tuple(network))


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Can a TCP connection to the hub (``HF_ENDPOINT``, default huggingface.co) be opened?"""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def cmd_weights(args: argparse.Namespace) -> int:
    from .backbones import BACKBONES, expected_path, fetch_weights, get_spec, weights_path

    if args.weights_command == "list":
        for name, spec in BACKBONES.items():
            found = weights_path(spec, args.weights_dir)
            state = (
                f"present: {found}"
                if found
                else (
                    "random init (no file needed)"
                    if spec.random_init
                    else f"missing: {expected_path(spec, args.weights_dir)}"
                )
            )
            print(f"{name:42s} {spec.description:55s} {state}")
        return EXIT_OK
    spec = get_spec(args.name)
    found = weights_path(spec, args.weights_dir)
    if found and args.if_missing:
        print(f"{spec.name}: already present at {found}")
        return EXIT_OK
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    reachable = _hub_reachable()
    if not reachable:
        # Offline: only the local Hugging Face cache can help; skip minutes of retries against the network.
        if not args.offline_ok:
            log.info("the Hugging Face hub is not reachable; looking in the local cache only")
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        path = fetch_weights(spec.name, args.weights_dir)
    except Exception as exc:  # offline, hub refused, disk full: say what to do instead
        if args.offline_ok and (not reachable or _network_error(exc)):
            print(
                f"cosod weights: {spec.name} not fetched: the Hugging Face hub is not reachable (offline?); "
                f"put the file at {expected_path(spec, args.weights_dir)} (see weights/README.md), a running "
                "backend picks it up without a restart"
            )
            return EXIT_OK
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(
            f"cosod weights: cannot fetch {spec.name} ({reason}); put the file at "
            f"{expected_path(spec, args.weights_dir)}",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    print(f"{spec.name}: saved to {path}")
    return EXIT_OK


COMMANDS = {
    "predict": cmd_predict,
    "train": cmd_train,
    "pseudo-label": cmd_pseudo_label,
    "eval": cmd_eval,
    "weights": cmd_weights,
}


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import CoSODError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except (UsageError, CoSODError, ValueError) as exc:
        print(
            f"cosod {args.command}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
