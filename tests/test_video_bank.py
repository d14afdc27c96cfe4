"""The video feature bank (`--consistency bank`) and residual CFG (`--cfg-mode`) on tiny models."""

import json
import subprocess
from fractions import Fraction
from itertools import pairwise

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stylekit.engine.attention import BankAttnProcessor, self_attention_layers
from stylekit.engine.bank import FeatureBank, Row
from stylekit.engine.predict import Residual, cfg_rows, noise_predictor
from stylekit.engine.sampling import lcm_step
from stylekit.engine.stream import FrameStream, StreamOptions
from stylekit.media.video import ffmpeg_exe, probe

SETTINGS = dict(accelerator="none", scheduler="lcm", steps=2, strength=0.5, style_mode="none")


def open_tiny(sd15_path, cfg: float):
    from stylekit.session import Runtime, open_session, resolve_settings

    settings = resolve_settings(None, None, dict(model=str(sd15_path), cfg=cfg, **SETTINGS))
    return open_session(settings, runtime=Runtime(device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def plain(sd15_path):
    return open_tiny(sd15_path, cfg=1.0)


@pytest.fixture(scope="module")
def guided(sd15_path):
    session = open_tiny(sd15_path, cfg=3.0)
    assert session.cond.do_cfg  # the tiny UNet has no w-embedding: real CFG rows
    return session


def run(session, frames, **options):
    opts = StreamOptions(steps=2, strength=0.5, seed=3, **options)
    fs = FrameStream(session.model, session.cond, session.sampler, opts)
    return [out.copy() for out in fs.run(frames)], fs


PAN = 2  # px the panned clip moves left per frame


def panned(count: int = 8, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """A smooth colour pattern panning left by PAN px per frame."""
    yy, xx = np.mgrid[0:height, 0 : width + count * PAN]
    waves = np.stack([np.sin(xx / 5), np.cos(yy / 4 + xx / 9), np.sin((xx + yy) / 7)], axis=-1)
    pattern = (127 + 100 * waves).astype(np.uint8)
    return [pattern[:, PAN * i : PAN * i + width].copy() for i in range(count)]


# --- the bank ----------------------------------------------------------------------------------


def test_bank_update_merges_duplicates_appends_the_rest_and_drops_the_oldest():
    """Hand-computed: one head, d = 2, one frame = 2 tokens, a bank of 2 frames (4 tokens)."""
    bank = FeatureBank(size=2, merge=0.9)
    k0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (heads, N, d)
    v0 = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    slot = bank.update(None, k0, v0, frame=0)
    # frame 1: token 0 points like banked token 0 (cosine 1), token 1 like nothing (cosine 0.6)
    k1 = torch.tensor([[[3.0, 0.0], [-0.6, -0.8]]])
    v1 = torch.tensor([[[5.0, 5.0], [7.0, 7.0]]])
    slot = bank.update(slot, k1, v1, frame=1)
    expect_k = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-0.6, -0.8]]])  # (1 + 3) / 2; appended
    torch.testing.assert_close(slot.k, expect_k)
    torch.testing.assert_close(slot.v, torch.tensor([[[3.0, 3.0], [2.0, 2.0], [7.0, 7.0]]]))
    assert slot.age.tolist() == [1, 0, 1]  # the merged token is current again
    # frame 2: two new tokens: the bank would hold 5 > 4, the oldest (frame 0's) goes
    k2 = torch.tensor([[[0.0, -1.0], [0.8, -0.6]]])
    slot = bank.update(slot, k2, k2.clone(), frame=2)
    assert slot.tokens == slot.bound == 4 and slot.age.tolist() == [1, 1, 2, 2]
    torch.testing.assert_close(slot.k[0, 1], torch.tensor([-0.6, -0.8]))  # bank order kept
    never = FeatureBank(size=1, merge=None)  # the anchor: one frame, replaced whole
    assert torch.equal(never.update(never.update(None, k0, v0, 0), k1, v1, 1).k, k1)


def test_bank_never_exceeds_its_bound_over_a_long_clip(plain):
    """40 frames, every one stored into a 2-frame bank, in stream batch: after every output every
    slot holds at most 2 frames' tokens, and a changing clip fills it to exactly that. Merging is
    off here: the tiny random model's keys are so alike (cosine ≥ 0.98 between random frames)
    that the default threshold merges nearly every token and the bank would never fill."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(40)]
    opts = dict(consistency="bank", bank_size=2, bank_every=1, bank_merge=None, stream_batch=True)
    fs = FrameStream(
        plain.model, plain.cond, plain.sampler, StreamOptions(steps=2, strength=0.5, **opts)
    )
    outputs = 0
    for _ in fs.run(frames):
        outputs += 1
        slots = [s for layers in fs._bank.slots.values() for s in layers.values()]
        assert all(s.tokens <= s.bound for s in slots)
    assert outputs == 40 and fs.stats.banked == 40
    assert all(s.tokens == s.bound for s in slots)  # full: the bound was reached, and held
    assert {s.bound for s in slots} == {2 * 16, 2 * 4}  # 4x4 and 2x2 latent tokens per frame
    assert fs.stats.bank_peak == 2 * 16
    # a static clip merges every token: the bank stays at one frame's tokens
    _, still = run(plain, [frames[0]] * 6, consistency="bank", bank_size=2, bank_every=1)
    assert all(s.tokens == s.bound // 2 for ls in still._bank.slots.values() for s in ls.values())


def unpanned_change(frames: list[np.ndarray]) -> float:
    """Mean |frame i+1 − frame i| in grey levels after shifting frame i by the known pan."""
    diffs = [np.abs(b[:, :-PAN].astype(int) - a[:, PAN:].astype(int)) for a, b in pairwise(frames)]
    return float(np.mean(diffs))


@pytest.mark.parametrize("seed", [0, 1])
def test_panned_clip_changes_less_with_the_bank_than_with_none(plain, seed):
    """Frame-to-frame change of the output of a panned clip after undoing the pan, sequential path.
    Measured on the tiny random model (LCM 2 steps, strength 0.5, seeds 0-2): none (fresh noise)
    41.8-43.6 grey levels, the bank 27.2-28.1 (0.64-0.67 of none); 0.8 leaves a margin. Random
    weights make the output follow the fixed noise more than the input, so most of this gain is
    the bank mode's fixed noise: the bank's own effect on pixels (frames differ, by < 0.01 grey
    levels on average) is tested at the attention layer below, where it is structural."""
    frames = panned()
    change = {}
    for mode in ("none", "bank"):
        outs, fs = run(plain, frames, consistency=mode, bank_every=1, stream_batch=False)
        change[mode] = unpanned_change(outs)
    assert change["bank"] < 0.8 * change["none"], change


def test_bank_attention_follows_a_pan(plain):
    """One self-attention layer of the tiny UNet; frame B is frame A panned by one token. With A's
    k/v banked, B's queries find all of A's tokens (and B's new column at half A's weight): B's
    attention output, pan undone, is nearer A's than B's output without the bank: the error
    halves (measured 0.499-0.500 of it, seeds 0-3; asserted < 0.75)."""
    unet = plain.model.unet
    name = self_attention_layers(unet)[0]
    attn = unet.get_submodule(name.removesuffix(".processor"))
    h, w, c = 8, 8, attn.to_q.in_features
    ratios = []
    for seed in range(4):
        grid = torch.randn(1, h, w + 1, c, generator=torch.Generator().manual_seed(seed))
        frame_a, frame_b = (x.reshape(1, h * w, c) for x in (grid[:, :, :w], grid[:, :, 1:]))
        bank = FeatureBank(size=1, merge=None)
        processor = BankAttnProcessor(name, bank)
        with torch.no_grad():
            bank.set_rows([Row((0, 0), 0, writes=False)])  # nothing banked yet: plain attention
            without = processor(attn, frame_b)
            bank.set_rows([Row((0, 0), 0, writes=True)])
            out_a = processor(attn, frame_a)  # A attends to itself and banks its k, v
            bank.set_rows([Row((0, 0), 1, writes=False)])
            with_bank = processor(attn, frame_b)
        target = out_a.reshape(h, w, c)[:, 1:]  # A's output where B's tokens came from
        errors = [
            (out.reshape(h, w, c)[:, :-1] - target).abs().mean() for out in (with_bank, without)
        ]
        ratios.append(float(errors[0] / errors[1]))
    assert max(ratios) < 0.75, ratios


def test_bank_changes_the_frames_and_restores_the_processors(plain):
    frames = panned(4)
    processors = {k: type(v) for k, v in plain.model.unet.attn_processors.items()}
    noise, _ = run(plain, frames, stream_batch=False)
    bank, fs = run(plain, frames, consistency="bank", bank_every=1, stream_batch=False)
    assert np.array_equal(noise[0], bank[0])  # frame 0 reads an empty bank: the same computation
    assert all(not np.array_equal(a, b) for a, b in zip(noise[1:], bank[1:], strict=True))
    assert list(fs._processors) == self_attention_layers(plain.model.unet)  # all of them
    assert {k: type(v) for k, v in plain.model.unet.attn_processors.items()} == processors


# --- residual CFG ------------------------------------------------------------------------------


def uncond_cond(session, z, t):
    """The UNet's unconditional and conditional outputs, one call each (the hand computation)."""
    unet, embeds = session.model.unet, session.cond.prompt_embeds
    return [
        unet(z, t, encoder_hidden_states=embeds[i : i + 1].expand(len(z), -1, -1))[0]
        for i in (0, 1)
    ]


def test_residual_cfg_formulas_against_a_hand_computation(guided):
    """self: e_u = δ ε̄ with ε̄ = (z − √ā z0) / √(1 − ā); initialize: the real e_u on its rows,
    whose clean estimate becomes their reference; full and none as usual."""
    torch.manual_seed(0)
    z0, z = torch.randn(2, 2, 4, 8, 8)  # (2 latents, 4, 8, 8) each
    t, g, delta = 499, guided.cond.cfg, 0.7
    a = guided.sampler.ac[t]
    e_u, e_c = uncond_cond(guided, z, t)
    predictor = dict(cfg_mode="self", sampler=guided.sampler, delta=delta)
    with torch.no_grad():
        eps = noise_predictor(guided.model, guided.cond, 64, 64, **predictor)
        got = eps(z, t, Residual(z0.clone()))
        stock = (z - a.sqrt() * z0) / (1 - a).sqrt()
        torch.testing.assert_close(got, delta * stock + g * (e_c - delta * stock))
        predictor["cfg_mode"] = "initialize"
        eps = noise_predictor(guided.model, guided.cond, 64, 64, **predictor)
        residual = Residual(z0.clone(), real=(True, False))
        got = eps(z, t, residual)
        real = e_u[:1] + g * (e_c[:1] - e_u[:1])  # row 0: real CFG
        torch.testing.assert_close(got[:1], real, rtol=1e-4, atol=1e-5)  # 3 rows vs 2: rounding
        torch.testing.assert_close(got[1:], delta * stock[1:] + g * (e_c[1:] - delta * stock[1:]))
        x0_u = (z[:1] - (1 - a).sqrt() * e_u[:1]) / a.sqrt()
        torch.testing.assert_close(residual.ref[:1], x0_u, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(residual.ref[1:], z0[1:])  # the self row keeps its reference
        full = noise_predictor(guided.model, guided.cond, 64, 64)(z, t)
        torch.testing.assert_close(full, e_u + g * (e_c - e_u), rtol=1e-4, atol=1e-5)
        none = noise_predictor(guided.model, guided.cond, 64, 64, cfg_mode="none")(z, t)
        torch.testing.assert_close(none, e_c)


def test_closed_form_residual_noise_is_streamdiffusions_recursion(guided):
    """StreamDiffusion updates the stock noise after an LCM step as ε̄' = n' + Δ·√ā'/√(1−ā'),
    Δ = c_out(β ε̄ − β ε)/α + c_skip β ε̄. Ours is ε̄' = (z' − √ā' z0)/√(1 − ā'); the two differ
    by exactly (c_out + c_skip α − 1) z0 · √ā'/√(1−ā') (their Δ assumes c_out + c_skip α = 1)."""
    torch.manual_seed(1)
    ac = guided.sampler.ac.double()
    z0, stock, eps, fresh = torch.randn(4, 1, 4, 8, 8, dtype=torch.float64)
    t, t_next = 699, 499
    alpha, beta = ac[t].sqrt(), (1 - ac[t]).sqrt()
    z = alpha * z0 + beta * stock  # z carries `stock` over z0
    z_next = lcm_step(eps, t, t_next, z, ac, noise=fresh)
    ours = (z_next - ac[t_next].sqrt() * z0) / (1 - ac[t_next]).sqrt()
    tau = t * 10.0
    c_skip, c_out = 0.25 / (tau**2 + 0.25), tau / (tau**2 + 0.25) ** 0.5
    delta = c_out * (beta * stock - beta * eps) / alpha + c_skip * beta * stock
    scale = ac[t_next].sqrt() / (1 - ac[t_next]).sqrt()
    theirs = fresh + delta * scale
    torch.testing.assert_close(ours - theirs, (c_out + c_skip * alpha - 1) * z0 * scale)
    assert (ours - theirs).abs().max() < 1e-6  # negligible at these timesteps


@pytest.mark.parametrize(
    ("mode", "rows"), [("full", 4), ("self", 2), ("initialize", 3), ("none", 2)]
)
def test_unet_rows_per_frame(guided, mode, rows):
    """Stream batch with N = 2 stages: full 2N, self N, initialize N + 1, none N rows a call."""
    frames = panned(6)
    calls = []
    handle = guided.model.unet.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        outs, fs = run(guided, frames, cfg_mode=mode, stream_batch=True)
    finally:
        handle.remove()
    assert len(outs) == 6 and len(calls) == 6 + 1  # one call per frame, one to drain
    assert max(calls) == rows and sum(calls) == fs.stats.unet_rows
    assert fs.stats.unet_rows == 6 * rows  # every frame runs each stage once (and the extra row)
    assert cfg_rows(2, guided.cond, mode, (True, False)) == fs_plan(mode)


def fs_plan(mode):
    """The rows of a 2-latent call with latent 0 at the first stage, uncond rows first."""
    cond = [(0, 1), (1, 1)]
    return {"full": [(0, 0), (1, 0)], "initialize": [(0, 0)]}.get(mode, []) + cond


def test_residual_cfg_in_the_stream_differs_from_full_but_not_from_itself(guided):
    frames = panned(4)
    full, _ = run(guided, frames, stream_batch=False)
    for mode in ("self", "initialize"):
        seq, fs = run(guided, frames, cfg_mode=mode, stream_batch=False)
        assert fs.residual and any(not np.array_equal(a, b) for a, b in zip(full, seq, strict=True))
        again, _ = run(guided, frames, cfg_mode=mode, stream_batch=False)
        assert all(np.array_equal(a, b) for a, b in zip(seq, again, strict=True))


def test_bad_bank_and_cfg_options_are_usage_errors():
    from stylekit.errors import UsageError

    for bad in (dict(cfg_mode="half"), dict(bank_size=0), dict(bank_every=-1), dict(bank_merge=0)):
        with pytest.raises(UsageError):
            StreamOptions(**bad).check()


# --- end to end --------------------------------------------------------------------------------


def test_bank_and_self_cfg_through_the_cli_keep_audio_and_timestamps(sd15_path, tmp_path):
    clip, out = tmp_path / "clip.mp4", tmp_path / "styled.mp4"
    ffmpeg = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    subprocess.run(
        [
            *ffmpeg,
            *("-f", "lavfi", "-i", "testsrc2=size=66x50:rate=30000/1001"),
            *("-f", "lavfi", "-t", "0.3", "-i", "sine=frequency=440:sample_rate=44100"),
            *("-frames:v", "8", "-c:v", "libx264", "-pix_fmt", "yuv444p", "-c:a", "aac"),
            str(clip),
        ],
        check=True,
    )
    from stylekit import cli

    args = ["video", str(clip), "--model", str(sd15_path), "--accelerator", "none"]
    args += ["--scheduler", "lcm", "--steps", "2", "--strength", "0.5", "--cfg", "2"]
    args += ["--device", "cpu", "--dtype", "fp32", "--seed", "1", "--json", "-q", "-o", str(out)]
    args += ["--consistency", "bank", "--bank-size", "2", "--cfg-mode", "self"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(next(ln for ln in result.stdout.splitlines() if ln.startswith("{")))
    src, got = probe(clip), probe(out)
    assert (got.size, got.frame_count, got.fps) == ((66, 50), 8, Fraction(30000, 1001))
    assert got.audio_codec == "aac" and got.pts == src.pts
    meta = record["settings"]
    assert (meta["consistency"], meta["bank_size"], meta["bank_every"]) == ("bank", 2, 4)
    assert (meta["cfg_mode"], meta["residual_cfg"], meta["cfg_scale"]) == ("self", True, 2.0)
    assert meta["unet_rows"] == 8 * 2  # N rows a frame: no unconditional pass


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--cfg-mode", "half"), "unknown cfg mode 'half'"),
        (("--consistency", "bank", "--bank-size", "0"), "bank_size must be >= 1"),
        (("--consistency", "bank", "--tiled"), "--consistency bank has no --tiled"),
        (("--cfg-mode", "self", "--tiled"), "--cfg-mode self has no --tiled"),
    ],
)
def test_bad_bank_and_cfg_flags_are_one_line_usage_errors(sd15_path, tmp_path, flags, message):
    from stylekit import cli

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # never read: the options are refused before any input
    args = ["video", str(clip), "--model", str(sd15_path), "--device", "cpu", *flags]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
