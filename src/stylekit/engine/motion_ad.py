"""AD guidance per window in motion mode: the window's frames refined jointly by the motion UNet.

See docs/video.md. `VideoUNet` lets the AD refinement (`ad.refine`) drive the motion UNet on
frame rows: it takes (F, C, h, w) latents, runs them as one video (1, C, F, h, w) and returns
(F, C, h, w). Its attention processors are the motion UNet's, so the recording processors go on
the spatial self-attention layers by name (`attention.select_layers` never picks motion_modules
layers), where each of the F rows is one frame. The references are noised and recorded as
before, each as a 1-frame video (the motion UNet has no 2-D pass). The loss is the AD loss over
the window's frame rows, scaled by F as `ad.refine` scales any batch, so each frame's gradient is
its own loss's through the jointly run UNet; iterations and learning rate are the run's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stylekit.engine import ad
from stylekit.engine.attention import Features
from stylekit.engine.models import LoadedModel
from stylekit.engine.sampling import add_noise

# refine(z (F, C, h, w), t, content (z0, noise) per frame or None) -> refined z
WindowGuidance = Callable[[torch.Tensor, int, tuple | None], torch.Tensor]


class VideoUNet(torch.nn.Module):
    """The motion UNet seen as a per-frame UNet: (F, C, h, w) in, (F, C, h, w) out, one video."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def attn_processors(self):
        return self.unet.attn_processors

    def set_attn_processor(self, processors) -> None:
        self.unet.set_attn_processor(processors)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.unet.is_gradient_checkpointing

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    def forward(self, x, t, *, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        """Text rows per frame (F, 77, D), as the motion predictor passes them; SDXL's added
        embeddings per video (the motion UNet repeats them per frame)."""
        kwargs.pop("return_dict", None)
        if added_cond_kwargs is not None:
            added_cond_kwargs = {k: _first(v) for k, v in added_cond_kwargs.items()}
        out = self.unet(
            x.permute(1, 0, 2, 3)[None],  # (1, C, F, h, w)
            t,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
            **kwargs,
        )[0]
        return (out[0].permute(1, 0, 2, 3),)


def _first(value):
    """The first row of a tensor (or of each tensor in a list): the video's, not the frames'."""
    if isinstance(value, (list, tuple)):
        return type(value)(_first(v) for v in value)
    return value[:1] if isinstance(value, torch.Tensor) and value.ndim > 0 else value


def reference_features(
    model: LoadedModel, refs: ad.References, cache: ad.FeatureCache, t: int, ac: torch.Tensor
) -> list[Features]:
    """Every noised reference's features at t through the motion UNet (a 1-frame video each),
    computed once per run (`cache`: a motion run fills it only from here)."""
    if t not in cache.noised:
        video = VideoUNet(model.unet)
        cache.noised[t] = [
            ad.reference_features(
                video, ad.noised(refs, i, t, ac), t, ad.unet_inputs(model, refs, z), refs.layers
            )
            for i, z in enumerate(refs.latents)
        ]
        cache.passes += len(refs.latents)
    return cache.noised[t]


def refine_window(
    model: LoadedModel,
    refs: ad.References,
    cache: ad.FeatureCache,
    z: torch.Tensor,
    t: int,
    ac: torch.Tensor,
    content: torch.Tensor | None = None,
) -> ad.Refined:
    """One AD refinement of a window's frames z (F, C, h, w) at t, jointly: AdaIN per frame
    first when on, then `iters` Adam steps on the AD loss of the window's frame rows (plus the
    content term against `content`, the frames' z0 noised to t, when weighted)."""
    o = refs.options
    if o.adain:
        z = ad.adain_to(refs, z, t, ac)
    if o.iters == 0:
        return ad.Refined(z, float("nan"))
    video = VideoUNet(model.unet)
    inputs = ad.unet_inputs(model, refs, z)
    content_feats = None
    if content is not None and o.content_weight:
        content_feats = ad.reference_features(video, content, t, inputs, refs.layers)
    return ad.refine(
        video,
        z,
        t,
        inputs,
        reference_features(model, refs, cache, t, ac),
        layers=refs.layers,
        iters=o.iters,
        lr=o.lr,
        content_feats=content_feats,
        content_weight=o.content_weight if content_feats is not None else 0.0,
        masks=refs.masks,
        checkpointing=ad.plan_for(model, refs, cache, z).checkpointing,  # all F rows at once
    )


def window_guidance(
    model: LoadedModel, refs: ad.References, cache: ad.FeatureCache, ac: torch.Tensor
) -> WindowGuidance:
    """`MotionStream`'s hook: refine(z, t, content) with content (z0, start noise) per frame."""

    def refine(z: torch.Tensor, t: int, content: tuple | None = None) -> torch.Tensor:
        noisy = None if content is None else add_noise(content[0], content[1], t, ac)
        return refine_window(model, refs, cache, z, t, ac, noisy).x

    return refine
