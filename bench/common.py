"""Shared by the benchmark scripts: where a backbone's weights come from when timing it here."""

from __future__ import annotations

from pathlib import Path

import torch

from cosod.backbones import get_spec, weights_path


def weights_for(name: str, scratch: Path) -> tuple[str | None, str]:
    """The weights folder to use for backbone ``name`` and a note on where its weights came from.

    A missing pretrained file (no internet here) is replaced by one with the real architecture and random
    values, written to ``scratch``: timings are those of the real network, masks are not."""
    spec = get_spec(name)
    if spec.random_init:
        return None, "random init (test backbone)"
    found = weights_path(spec)
    if found:
        return str(found.parent), f"pretrained file {found}"
    import timm

    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    # saved under the accepted `.pth` name: the spec's own file name is the hub's file, whose sha256 is pinned
    torch.save(model.state_dict(), scratch / f"{spec.name}.pth")
    return str(scratch), "RANDOM weights of the real architecture (no file in weights/): timing only"
