"""IP-Adapter style injection with InstantStyle's style-block-only scale map, found by structure."""

from __future__ import annotations

from stylekit.errors import ModelError


def style_block(unet) -> str:
    """Return InstantStyle's style block, found by structure: the first up block with attentions.

    SDXL (attention in the deepest up block): only its middle attention, `up_blocks.0.attentions.1`
    (InstantStyle's SDXL map, STD's recipe). SD1.x/2.x (no attention in the deepest up block): the
    whole block, `up_blocks.1`, as InstantStyle's SD1.5 code targets it.
    """
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        if attentions and i == 0:  # SDXL layout
            return f"up_blocks.0.attentions.{len(attentions) // 2}"
        if attentions:  # SD1.x/2.x layout
            return f"up_blocks.{i}"
    raise ModelError(
        "this UNet has no up block with attention layers; IP-Adapter styling needs one"
    )


def ip_adapter_layers(unet) -> dict[str, object]:
    """The IP-Adapter attention processors, by processor name."""
    return {
        name: proc
        for name, proc in unet.attn_processors.items()
        if hasattr(proc, "scale") and hasattr(proc, "to_k_ip")
    }


def set_style_scale(unet, scale: float, *, block: str | None = None) -> list[str]:
    """Scale IP-Adapter layers: `scale` inside `block` (default: the style block), 0 elsewhere.

    Returns the layers given a non-zero scale; a map that zeroes every layer is refused.
    `block=""` applies the scale everywhere (plain IP-Adapter).
    """
    layers = ip_adapter_layers(unet)
    if not layers:
        raise ModelError("no IP-Adapter is loaded into the UNet")
    prefix = style_block(unet) if block is None else block
    active = []
    for name, proc in layers.items():
        inside = prefix == "" or name.startswith(prefix + ".")
        proc.scale = [scale if inside else 0.0 for _ in proc.scale]
        if inside:
            active.append(name)
    if not active:
        raise ModelError(
            f"the style block {prefix!r} has no IP-Adapter layer; every scale would be 0"
        )
    return active
