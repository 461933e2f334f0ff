"""Frozen ViT backbones (DINO, DINOv2 and a tiny random ViT for tests) built through timm.

One forward pass gives, per image, the three things the methods need (method_spec C):

- ``tokens``: last-layer patch tokens after the final LayerNorm (prefix tokens dropped), ``(B, h, w, C)``;
- ``keys``: the last block's attention keys, heads concatenated, ``(B, h, w, C)``;
- ``cls_attention``: the last block's CLS->patch attention averaged over heads and min-max normalised to
  ``[0, 1]`` per image, ``(B, h, w)``.

Weights are data, not code: every backbone is a :class:`BackboneSpec` in :data:`BACKBONES`. They are read from
a file in the weights directory (``COSOD_WEIGHTS_DIR``, default ``weights/``) and fetched only by an explicit
:func:`fetch_weights` (``cosod weights fetch NAME``), never as a side effect of building or predicting.

A weights file is identified by its content: :attr:`Backbone.fingerprint` is the start of the file's sha256
(cached in a ``<file>.sha256`` sidecar, see :mod:`cosod.checksums`), so a copied file keeps the backbone's id
and every ``model_version`` derived from it. Where the hub publishes a file's sha256, the spec pins it and a
file with other content is refused, at fetch time and at load time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checksums import cached_sha256, copy_with_sha256
from .errors import UnknownBackboneError, WeightsChecksumError, WeightsInvalidError, WeightsMissingError
from .paths import DEFAULT_WEIGHTS_DIR as DEFAULT_WEIGHTS_DIR  # defined there: importable without torch
from .paths import weights_dir

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its timm architecture, where its weights come from, and its token layout.

    ``filename`` is the file :func:`fetch_weights` writes: for a hub backbone, the hub's ``hub_filename``
    copied byte for byte, so ``sha256`` (the digest the hub publishes for it) can be checked on every load.
    ``alt_filenames`` are also accepted (official release files, state dicts saved by hand); no digest is
    published for them, so their content is hashed for the backbone's id but not checked.
    """

    name: str
    timm_name: str
    hub_id: str | None
    filename: str | None
    patch_size: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sha256: str | None = None  # pinned digest of `filename` (= the hub file), when one is published
    alt_filenames: tuple[str, ...] = ()  # e.g. the official DINO release file names
    hub_filename: str = "model.safetensors"  # the file fetched from the hub repository `hub_id`
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    random_init: bool = False  # build without weights when no file is present (tests only)
    description: str = ""


# Pinned sha256 values are the digests the Hugging Face hub shows ("Git LFS Details") on the page
# https://huggingface.co/{hub_id}/blob/{revision}/model.safetensors, read at these revisions:
#   timm/vit_small_patch8_224.dino  06cd8ed4b3fcef6305223df082ef8c19bc775704
#   timm/vit_base_patch8_224.dino   57b4c6dac26b2cff845bfbed5bf37c9dd32ec496
# No published digest was found for the two DINOv2 hub files, nor for the official DINO release files
# (dl.fbaipublicfiles.com publishes none): those stay unpinned (None).
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="vit_small_patch8_224.dino",
            timm_name="vit_small_patch8_224.dino",
            hub_id="timm/vit_small_patch8_224.dino",
            filename="vit_small_patch8_224.dino.safetensors",
            sha256="e1b79616ce6d1b8dc3cc0d5952b6d0958356a189122882493e665d28f20654a0",  # see above
            alt_filenames=("vit_small_patch8_224.dino.pth", "dino_deitsmall8_pretrain.pth"),
            patch_size=8,
            embed_dim=384,
            num_heads=6,
            num_prefix_tokens=1,
            description="DINO ViT-S/8 (default)",
        ),
        BackboneSpec(
            name="vit_base_patch8_224.dino",
            timm_name="vit_base_patch8_224.dino",
            hub_id="timm/vit_base_patch8_224.dino",
            filename="vit_base_patch8_224.dino.safetensors",
            sha256="01be14b99784a4c0970a5703214513588daf27014e908ac7ea08967b7bd80f5f",  # see above
            alt_filenames=("vit_base_patch8_224.dino.pth", "dino_vitbase8_pretrain.pth"),
            patch_size=8,
            embed_dim=768,
            num_heads=12,
            num_prefix_tokens=1,
            description="DINO ViT-B/8 (the SCoSPARC paper's backbone)",
        ),
        BackboneSpec(
            name="vit_small_patch14_reg4_dinov2.lvd142m",
            timm_name="vit_small_patch14_reg4_dinov2.lvd142m",
            hub_id="timm/vit_small_patch14_reg4_dinov2.lvd142m",
            filename="vit_small_patch14_reg4_dinov2.lvd142m.safetensors",
            alt_filenames=("vit_small_patch14_reg4_dinov2.lvd142m.pth",),
            patch_size=14,
            embed_dim=384,
            num_heads=6,
            num_prefix_tokens=5,
            description="DINOv2 ViT-S/14 with 4 registers",
        ),
        BackboneSpec(
            name="vit_base_patch14_reg4_dinov2.lvd142m",
            timm_name="vit_base_patch14_reg4_dinov2.lvd142m",
            hub_id="timm/vit_base_patch14_reg4_dinov2.lvd142m",
            filename="vit_base_patch14_reg4_dinov2.lvd142m.safetensors",
            alt_filenames=("vit_base_patch14_reg4_dinov2.lvd142m.pth",),
            patch_size=14,
            embed_dim=768,
            num_heads=12,
            num_prefix_tokens=5,
            description="DINOv2 ViT-B/14 with 4 registers (UMS-CoSOD's second backbone)",
        ),
        BackboneSpec(
            name="tiny",
            timm_name="vit_small_patch8_224",
            hub_id=None,
            filename="tiny.pth",
            patch_size=8,
            embed_dim=48,
            num_heads=3,
            num_prefix_tokens=1,
            model_kwargs=(("embed_dim", 48), ("depth", 2), ("num_heads", 3), ("mlp_ratio", 2.0)),
            random_init=True,
            description="tiny randomly initialised ViT (patch 8, dim 48, depth 2) for tests and CI",
        ),
        BackboneSpec(
            name="tiny_dinov2",
            timm_name="vit_small_patch14_reg4_dinov2",
            hub_id=None,
            filename="tiny_dinov2.pth",
            patch_size=14,
            embed_dim=48,
            num_heads=3,
            num_prefix_tokens=5,
            model_kwargs=(("embed_dim", 48), ("depth", 2), ("num_heads", 3), ("mlp_ratio", 2.0)),
            random_init=True,
            description="tiny random DINOv2-shaped ViT (patch 14, 4 registers) for tests of the UMS path",
        ),
    )
}

ALIASES = {
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
}

DEFAULT_BACKBONE = "vit_small_patch8_224.dino"


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name or alias; raise :class:`UnknownBackboneError` naming the known ones."""
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        known = ", ".join(sorted(BACKBONES) + sorted(ALIASES))
        raise UnknownBackboneError(f"unknown backbone {name!r}; known: {known}")
    return BACKBONES[key]


def weights_path(spec: BackboneSpec, wdir: str | os.PathLike[str] | None = None) -> Path | None:
    """The existing weights file for ``spec`` (its own name first, then the official names), or None."""
    root = weights_dir(wdir)
    for fname in (spec.filename, *spec.alt_filenames):
        if fname and (root / fname).is_file():
            return root / fname
    return None


def expected_path(spec: BackboneSpec, wdir: str | os.PathLike[str] | None = None) -> Path:
    return weights_dir(wdir) / (spec.filename or f"{spec.name}.pth")


def weights_digest(spec: BackboneSpec, path: Path) -> str:
    """Content sha256 of the weights file ``path`` (cached in its sidecar), checked against ``spec.sha256``
    when ``path`` is the pinned file: :class:`WeightsChecksumError` naming both digests and the fix."""
    try:
        digest = cached_sha256(path)
        if spec.sha256 and path.name == spec.filename and digest != spec.sha256:
            digest = cached_sha256(path, use_sidecar=False)  # refuse on the content, never on a cache
    except OSError as exc:
        raise WeightsInvalidError(f"cannot read weights file {path}: {exc}") from exc
    if spec.sha256 and path.name == spec.filename and digest != spec.sha256:
        fix = (
            f"the file is corrupt, truncated or not {spec.hub_id}/{spec.hub_filename}: delete it and run "
            f"`cosod weights fetch {spec.name}` again"
            if spec.hub_id
            else "the file is corrupt, truncated or another one: replace it with the pinned file"
        )
        raise WeightsChecksumError(str(path), digest, spec.sha256, fix)
    return digest


@dataclass
class BackboneFeatures:
    """Per-image backbone outputs. All float32 tensors on the CPU unless stated otherwise.

    tokens: (B, h, w, C) last-layer post-norm patch tokens.
    keys: (B, h, w, C) last-block attention keys (heads concatenated).
    cls_attention: (B, h, w) head-mean CLS attention, min-max normalised per image to [0, 1].
    """

    tokens: torch.Tensor
    keys: torch.Tensor
    cls_attention: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.tokens.shape[1]), int(self.tokens.shape[2])

    def select(self, index: Sequence[int]) -> BackboneFeatures:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return BackboneFeatures(self.tokens[idx], self.keys[idx], self.cls_attention[idx])

    @staticmethod
    def concat(parts: Sequence[BackboneFeatures]) -> BackboneFeatures:
        return BackboneFeatures(
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.keys for p in parts]),
            torch.cat([p.cls_attention for p in parts]),
        )


def _minmax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


@dataclass
class Backbone:
    """A frozen timm ViT with a hook on the last block's qkv projection.

    Build it with :func:`build_backbone`; call :meth:`encode` with RGB uint8 images.
    """

    spec: BackboneSpec
    model: torch.nn.Module
    input_size: int = 224
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fingerprint: str = ""  # the first 12 hex digits of the weights file's content sha256 ("random<seed>")
    weights_file: str | None = None
    weights_sha256: str | None = None  # the weights file's full content sha256; None for a random init
    amp: bool = False  # bf16 autocast on CUDA: faster, not bit-exact with the official float32 run
    _qkv: list[torch.Tensor] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.input_size % self.spec.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not a multiple of the patch size {self.spec.patch_size}"
            )
        self.model.eval().requires_grad_(False)
        self.model.to(self.device)
        self.model.blocks[-1].attn.qkv.register_forward_hook(self._hook)  # type: ignore[index,union-attr]

    def _hook(self, _module: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        self._qkv.append(out)

    @property
    def id(self) -> str:
        """Names the features this backbone produces: spec, weights, input size (and bf16 autocast)."""
        amp = "@bf16" if self.amp and self.device.type == "cuda" else ""
        return f"{self.spec.name}@{self.fingerprint}@{self.input_size}{amp}"

    @property
    def grid(self) -> tuple[int, int]:
        g = self.input_size // self.spec.patch_size
        return g, g

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """List of HxWx3 uint8 RGB arrays -> (B, 3, S, S) float32, resized (bilinear, aspect not kept) and
        normalised with the spec's mean/std, as the official SCoSPARC loader does."""
        out = np.empty((len(images), 3, self.input_size, self.input_size), dtype=np.float32)
        mean = np.asarray(self.spec.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.spec.std, dtype=np.float32)[:, None, None]
        for i, img in enumerate(images):
            arr = np.asarray(img)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"image {i}: expected an HxWx3 uint8 RGB array, got {arr.dtype} {arr.shape}")
            pil = Image.fromarray(arr).resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
            x = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0
            out[i] = (x - mean) / std
        return torch.from_numpy(out)

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> BackboneFeatures:
        """(B, 3, S, S) normalised images -> :class:`BackboneFeatures` (float32, on the CPU)."""
        spec = self.spec
        self._qkv.clear()
        x = batch.to(self.device)
        use_amp = self.amp and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            seq = self.model.forward_features(x)  # type: ignore[operator]
        qkv = self._qkv.pop().float()
        self._qkv.clear()
        b, t, _ = qkv.shape
        heads, hd = spec.num_heads, spec.embed_dim // spec.num_heads
        q, k, _v = qkv.reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)  # each (B, heads, T, hd)
        p = spec.num_prefix_tokens
        gh, gw = self.grid
        keys = k.transpose(1, 2).reshape(b, t, heads * hd)[:, p:]
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * hd**-0.5  # (B, heads, 1, T)
        attn = logits.softmax(dim=-1)[:, :, 0, p:].mean(dim=1)  # (B, N)
        tokens = seq.float()[:, p:]
        return BackboneFeatures(
            tokens=tokens.reshape(b, gh, gw, -1).cpu(),
            keys=keys.reshape(b, gh, gw, -1).cpu(),
            cls_attention=_minmax(attn.reshape(b, gh, gw), (1, 2)).cpu(),
        )

    def encode(self, images: Sequence[np.ndarray], batch_size: int = 8) -> BackboneFeatures:
        """Features of a list of HxWx3 uint8 RGB images, run in chunks of ``batch_size``."""
        if not images:
            raise ValueError("encode() needs at least one image")
        parts = []
        for start in range(0, len(images), batch_size):
            parts.append(self.forward(self.preprocess(images[start : start + batch_size])))
        return BackboneFeatures.concat(parts)


def _create_model(spec: BackboneSpec, input_size: int, pretrained: bool = False) -> torch.nn.Module:
    import timm  # imported here: timm pulls torchvision, which is slow to import

    kwargs = dict(spec.model_kwargs)
    kwargs.setdefault("img_size", input_size)
    return timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=0, **kwargs)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, truncated download
        raise WeightsInvalidError(f"cannot read weights file {path}: {exc}") from exc
    for wrapper in ("state_dict", "model", "teacher"):  # official DINO full checkpoints nest the weights
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise WeightsInvalidError(f"weights file {path} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a timm or official DINO/DINOv2 state dict into ``model``; positional embeddings are resampled
    to the model's input size. Raise :class:`WeightsInvalidError` when keys or shapes do not fit."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = _read_state_dict(path)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "dino_head"))}
    try:
        sd = checkpoint_filter_fn(sd, model)  # type: ignore[arg-type]
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise WeightsInvalidError(f"weights file {path} does not fit the model: {exc}") from exc
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise WeightsInvalidError(
            f"weights file {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    input_size: int = 224,
    seed: int = 0,
    amp: bool = False,
) -> Backbone:
    """Build a frozen backbone from its weights file.

    The file is looked up in ``weights_dir`` (default ``$COSOD_WEIGHTS_DIR`` or ``weights/``) under the spec's
    file name or an official release name. Nothing is downloaded. A missing file raises
    :class:`WeightsMissingError` naming the expected path and the fetch command, except for specs marked
    ``random_init`` (the test backbone), which are then initialised from ``seed``. The file's content sha256
    names the weights in :attr:`Backbone.id`; the spec's pinned file with another digest raises
    :class:`WeightsChecksumError` before it is read.
    """
    spec = get_spec(name)
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create_model(spec, input_size)
    path = weights_path(spec, weights_dir)
    digest = None
    if path is None:
        if not spec.random_init:
            raise WeightsMissingError(spec.name, str(expected_path(spec, weights_dir)), spec.hub_id)
        fingerprint = f"random{seed}"
    else:
        digest = weights_digest(spec, path)
        load_weights(model, path)
        fingerprint = digest[:12]
        log.info("loaded backbone %s from %s (sha256 %s)", spec.name, path, digest)
    return Backbone(
        spec=spec,
        model=model,
        input_size=input_size,
        device=dev,
        fingerprint=fingerprint,
        weights_file=str(path) if path else None,
        weights_sha256=digest,
        amp=amp,
    )


def _download_hub_file(spec: BackboneSpec) -> Path:
    """The hub file of ``spec`` in the local Hugging Face cache, downloaded when missing."""
    from huggingface_hub import hf_hub_download

    assert spec.hub_id is not None
    return Path(hf_hub_download(spec.hub_id, spec.hub_filename))


def fetch_weights(name: str, weights_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download a backbone's hub file (``hub_id``/``hub_filename``) and copy it, byte for byte and
    atomically, to the file :func:`build_backbone` reads, with its sha256 sidecar. A download whose sha256 is
    not the spec's pinned one raises :class:`WeightsChecksumError` and leaves the weights folder unchanged.
    Needs internet access (or a populated Hugging Face cache)."""
    spec = get_spec(name)
    if not spec.hub_id:
        raise WeightsMissingError(spec.name, str(expected_path(spec, weights_dir)), None)
    src = _download_hub_file(spec)
    dest = expected_path(spec, weights_dir)

    def check(digest: str) -> None:
        if spec.sha256 and digest != spec.sha256:
            fix = (
                f"the download of {spec.hub_id}/{spec.hub_filename} is corrupt or not the expected file; "
                f"nothing was saved to {dest}. Delete the cached file and run `cosod weights fetch "
                f"{spec.name}` again"
            )
            raise WeightsChecksumError(str(src.resolve()), digest, spec.sha256, fix)

    digest = copy_with_sha256(src, dest, check)
    log.info("saved %s weights to %s (sha256 %s)", spec.name, dest, digest)
    return dest
