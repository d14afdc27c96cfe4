"""VAE decoding safety: a NaN or black half-precision decode is retried in fp32, never saved."""

import numpy as np
import pytest
import torch

from stylekit.engine import latents, models
from stylekit.errors import StylekitError


@pytest.fixture(scope="module")
def model(sd15_path):
    return models.load(
        models.ModelSpec(str(sd15_path), accelerator="none", dtype="bf16", device="cpu")
    )


def broken_in(model, monkeypatch, dtypes, value):
    """Make the VAE decode to `value` whenever it runs in one of `dtypes`; record the dtypes used."""
    seen = []
    original = model.vae.decode

    def decode(z, *args, **kwargs):
        seen.append(z.dtype)
        out = original(z, *args, **kwargs)
        if z.dtype in dtypes:
            return (torch.full_like(out[0], value),)
        return out

    monkeypatch.setattr(model.vae, "decode", decode)
    return seen


@pytest.mark.parametrize("value", [float("nan"), -1.0])  # -1 decodes to an all-black image
def test_degenerate_half_precision_decode_is_retried_in_fp32(model, monkeypatch, value):
    seen = broken_in(model, monkeypatch, {torch.bfloat16}, value)
    z = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    arr = latents.decode(model, z)
    assert seen == [torch.bfloat16, torch.float32]
    assert not np.isnan(arr).any() and arr.max() > 0
    assert model.vae.dtype == torch.bfloat16  # the VAE goes back to its own dtype


def test_decode_that_stays_broken_is_an_error(model, monkeypatch):
    broken_in(model, monkeypatch, {torch.bfloat16, torch.float32}, float("nan"))
    with pytest.raises(StylekitError, match="NaN"):
        latents.decode(model, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))


def test_batch_encode_draws_each_row_like_a_single_image(model):
    from PIL import Image

    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)) for _ in range(2)]
    both = latents.encode(model, images, [torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = latents.encode(model, images[1], torch.Generator().manual_seed(2))
    assert torch.allclose(both[1:].float(), alone.float(), atol=2e-2)
