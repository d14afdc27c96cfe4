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


# -1 decodes to an all-black image; ±inf must not be clamped into a white or black one
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1.0])
def test_degenerate_half_precision_decode_is_retried_in_fp32(model, monkeypatch, value):
    seen = broken_in(model, monkeypatch, {torch.bfloat16}, value)
    z = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    arr = latents.decode(model, z)
    assert seen == [torch.bfloat16, torch.float32]
    assert np.isfinite(arr).all() and arr.max() > 0
    assert model.vae.dtype == torch.bfloat16  # the VAE goes back to its own dtype


@pytest.mark.parametrize(
    ("value", "reason"),
    [(float("nan"), "NaN"), (float("inf"), "infinite"), (float("-inf"), "infinite")],
)
def test_decode_that_stays_broken_is_an_error(model, monkeypatch, value, reason):
    broken_in(model, monkeypatch, {torch.bfloat16, torch.float32}, value)
    with pytest.raises(StylekitError, match=reason):
        latents.decode(model, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))


def test_degenerate_names_nan_inf_and_black():
    ok = np.full((2, 8, 8, 3), 0.5, dtype=np.float32)
    assert latents.degenerate(ok) is None
    for value, reason in [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")]:
        bad = ok.copy()
        bad[1, 3, 4, 2] = value  # one pixel of one image in the batch is enough
        assert latents.degenerate(bad) == reason, value
    assert latents.degenerate(np.zeros_like(ok)) == "all black"


def test_batch_encode_draws_each_row_like_a_single_image(model):
    from PIL import Image

    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)) for _ in range(2)]
    both = latents.encode(model, images, [torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = latents.encode(model, images[1], torch.Generator().manual_seed(2))
    assert torch.allclose(both[1:].float(), alone.float(), atol=2e-2)
