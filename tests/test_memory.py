"""The memory estimate behind the size check (`stylekit.engine.memory`), as a table.

Each row is a job whose cost is known from measurements (benchmarks/README.md, "Memory") or
from what these models are known to need, with the range the estimate must land in: a
constant off by a factor of a few fails here.
"""

from __future__ import annotations

import pytest
import torch

from stylekit.engine import memory
from stylekit.engine.memory import Work, estimate

GIB, MIB = 2**30, 2**20

TABLE = [
    # (name, work, family, dtype bytes, VAE bytes, widths, low GiB, high GiB)
    # SD1.5 512² img2img, fp16: 2 GiB of weights, a 0.5 GiB decode; runs on 4 GB cards
    ("sd15 512 fp16", Work((512, 512)), "sd15", 2, None, (None, None), 2.0, 3.0),
    # SDXL 1024² with CFG, fp16 UNet, fp32 VAE (force_upcast): ~6.5 GiB weights + 4 GiB decode
    ("sdxl 1024 cfg", Work((1024, 1024), rows=2), "sdxl", 2, 4, (None, None), 8.0, 14.0),
    # AD on SDXL at 1024², micro-batch 2: backward activations 2 x 6.5 GiB (416 KiB/latent)
    ("sdxl 1024 AD x2", Work((1024, 1024), rows=4, grad_rows=2), "sdxl", 2, 4, (None, None), 12.0, 30.0),
    # a 4096² SD1.5 texture: 4 AD-refined 512² windows, 768² decode tiles, the canvas arrays
    (
        "sd15 texture 4096",
        Work((512, 512), rows=4, grad_rows=4, decode=(768, 768), canvas=(4096, 4096)),
        "sd15", 2, None, (None, None), 3.0, 8.0,
    ),
    # an 8192² photo at full size through SD1.5: the decode alone is 128 GiB
    ("sd15 8192 photo", Work((8192, 8192)), "sd15", 2, None, (None, None), 100.0, 200.0),
    # the hostile --size: terabytes, whatever the family
    ("sd15 100000²", Work((100000, 100000)), "sd15", 2, None, (None, None), 1024.0, None),
    ("sdxl 100000² texture",
     Work((1024, 1024), rows=4, decode=(768, 768), canvas=(100000, 100000)),
     "sdxl", 2, None, (None, None), 250.0, None),
    # the tests' tiny models (widths 32, fp32) at 64²: nothing
    ("tiny 64 fp32", Work((64, 64), rows=2), "sd15", 4, None, (32, 32), 0.0, 0.25),
]  # fmt: skip


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_the_estimate_lands_in_the_known_range(row):
    _, work, family, dtype_bytes, vae_bytes, widths, low, high = row
    est = estimate(work, family, dtype_bytes=dtype_bytes, vae_bytes=vae_bytes, widths=widths)
    assert est.peak >= low * GIB, est
    assert high is None or est.peak <= high * GIB, est


def test_the_parts_add_up_as_documented():
    work = Work((1024, 768), rows=2)
    est = estimate(work, "sd15", dtype_bytes=2)
    latent = 128 * 96
    assert est.weights == int(memory.PARAMS["sd15"] * 2)
    assert est.unet == int(memory.UNET_OVERHEAD + memory.UNET_FORWARD["sd15"] * latent * 2)
    assert est.vae == memory.VAE_BYTES_PER_PX * 1024 * 768
    assert est.canvas == 0 and est.peak == est.weights + max(est.unet, est.vae)
    texture = estimate(Work((512, 512), decode=(768, 768), canvas=(4096, 2048)), "sd15")
    assert texture.canvas == memory.CANVAS_BYTES_PER_PX * 4096 * 2048
    assert texture.peak == texture.weights + max(texture.unet, texture.vae + texture.canvas)
    # fp32 doubles the activations and the weights; a loaded model's weights are not counted
    est32 = estimate(work, "sd15", dtype_bytes=4, weights=False)
    assert est32.weights == 0 and est32.vae == 2 * est.vae
    # AD's backward pass dominates the forward rows
    ad = estimate(Work((1024, 768), rows=2, grad_rows=1), "sd15")
    assert ad.unet == int(memory.UNET_OVERHEAD + memory.UNET_GRAD["sd15"] * latent)
    # an unknown family is estimated as the largest
    assert estimate(work, "something-new") == estimate(work, "sdxl")


def test_too_big_says_how_much_and_what_dominates():
    est = estimate(Work((8192, 8192)), "sd15")
    assert memory.too_big(est, 1000 * GIB) is None
    assert memory.too_big(est, None) is None  # unknown free memory: no check
    reason = memory.too_big(est, 16 * GIB)
    assert reason == f"needs about {memory.human(est.peak)} (VAE decode 128 GiB), 16 GiB free"
    assert memory.human(1.5 * 2**40) == "1.5 TiB" and memory.human(300 * MIB) == "300 MiB"


def test_available_memory_on_this_cpu():
    free = memory.available(torch.device("cpu"))
    assert free is not None and 0 < free < 2**50
    assert memory.available(torch.device("meta")) is None  # unknown: no check


@pytest.mark.parametrize(
    ("limit", "current", "expected"),
    [
        ("max\n", "123\n", None),
        ("1000\n", "400\n", 600),
        ("1000\n", "1200\n", 0),
        (None, None, None),
    ],
)
def test_a_cgroup_limit_lowers_what_is_free(tmp_path, limit, current, expected):
    if limit is not None:
        (tmp_path / "memory.max").write_text(limit)
        (tmp_path / "memory.current").write_text(current)
    assert memory.cgroup_room(tmp_path) == expected


def test_each_control_adds_its_net_weights_and_activations():
    """A ControlNet adds its parameters and, per UNet row (AD's refined rows too), its
    activations per latent pixel; two add twice that; a loaded net's weights are not counted."""
    work, latent = Work((1024, 768), rows=2), 128 * 96
    plain = estimate(work, "sd15")
    canny = memory.ControlNet("canny", "sd15")
    one = estimate(work, "sd15", controls=[canny])
    two = estimate(work, "sd15", controls=[canny, memory.ControlNet("tile", "sd15")])
    net_weights = int(memory.CONTROL_PARAMS["sd15"] * 2)
    net_unet = memory.CONTROL_FORWARD["sd15"] * latent * 2
    assert one.weights == plain.weights + net_weights
    assert one.unet == int(plain.unet + net_unet) and one.control == int(net_unet)
    assert two.weights == plain.weights + 2 * net_weights
    assert two.unet == int(plain.unet + 2 * net_unet)
    assert two.peak > one.peak > plain.peak
    assert memory.Estimate(0, 10, 1, control=5).largest == ("UNet + ControlNet activations", 10)
    # SDXL's nets are larger; a net of width 32 (the tests') scales like the UNet
    xl = estimate(work, "sdxl", controls=[memory.ControlNet("depth", "sdxl")])
    assert xl.weights - estimate(work, "sdxl").weights == int(memory.CONTROL_PARAMS["sdxl"] * 2)
    tiny = estimate(work, "sd15", widths=(32, 32), controls=[memory.ControlNet("c", "sd15", 32)])
    base = estimate(work, "sd15", widths=(32, 32))
    assert tiny.weights - base.weights == int(memory.CONTROL_PARAMS["sd15"] * 0.01 * 2)
    # loaded: only the activations; AD's backward rows hold the residuals too
    loaded = estimate(work, "sd15", weights=False, controls=[canny])
    assert loaded.weights == 0 and loaded.unet == one.unet
    ad = Work((1024, 768), rows=1, grad_rows=1)
    assert estimate(ad, "sd15", controls=[canny]).unet == int(
        estimate(ad, "sd15").unet + memory.CONTROL_FORWARD["sd15"] * latent
    )
    # the depth control's estimator: its weights, once
    assert estimate(work, "sd15", depth=True).weights == plain.weights + memory.DEPTH_BYTES


def test_controlnet_figures_against_the_known_nets():
    """SD1.5's ControlNet has 361 M parameters (0.7 GB in 16 bits), SDXL's full one 1.25 G (its
    fp16 file is 2.5 GB): about a third of each family's pipeline weights."""
    assert 0.3e9 < memory.CONTROL_PARAMS["sd15"] < 0.4e9
    assert 1.2e9 < memory.CONTROL_PARAMS["sdxl"] < 1.3e9
    for family in ("sd15", "sdxl"):  # a net adds less than the UNet's own forward
        assert 0 < memory.CONTROL_FORWARD[family] < memory.UNET_FORWARD[family]
