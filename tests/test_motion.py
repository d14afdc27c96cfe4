"""Motion-module mode (`stylekit video --motion-adapter`): a tiny AnimateDiff MotionAdapter on the
tiny SD1.5 UNet. Structure (zeroed projections = the per-frame UNet), parity with diffusers'
AnimateDiffVideoToVideoPipeline for a clip in one window, windows that tile a longer clip with the
pyramid weights, memory that stays one window's over 200 frames, and the command line."""

import json
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stylekit.engine import motion as motion_module
from stylekit.engine.motion import MotionOptions, MotionStream, window_spans, window_weights
from stylekit.engine.stream import StreamOptions
from stylekit.media.video import ffmpeg_exe, probe, read_frames
from stylekit.runner import Output


@pytest.fixture(scope="module")
def adapters(models_dir):
    from stylekit.testing import build_motion_adapter

    return {
        "noisy": build_motion_adapter(models_dir / "motion"),
        "zero": build_motion_adapter(models_dir / "motion-zero", zero_out=True),
    }


def load(model, adapter, **extra):
    from stylekit.engine import models

    spec = models.ModelSpec(
        model=str(model),
        accelerator="none",
        motion_adapter=str(adapter),
        device="cpu",
        dtype="fp32",
        **extra,
    )
    return models.load(spec)


@pytest.fixture(scope="module")
def motion_model(sd15_path, adapters):
    return load(sd15_path, adapters["noisy"])


def frames_of(count, size=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def stream(model, *, kind="lcm", cfg=1.0, steps=2, strength=0.5, gamma=0.0, motion=None, **opts):
    from stylekit.engine.conditioning import encode_text
    from stylekit.engine.sampling import make_sampler

    cond = encode_text(model, "a cat", None, cfg=cfg)
    sampler = make_sampler(kind, dict(model.pipe.scheduler.config), gamma=gamma)
    options = StreamOptions(steps=steps, strength=strength, seed=5, **opts)
    return MotionStream(model, cond, sampler, options, motion or MotionOptions())


# --- structure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["zero", "noisy"])
def test_zeroed_temporal_projections_give_the_per_frame_unet(sd15_path, adapters, which):
    """With every temporal `proj_out` zeroed the motion UNet is the 2-D UNet frame by frame;
    the test adapter's non-zero projections change the output by far more (they mix frames)."""
    from diffusers import UNet2DConditionModel

    model = load(sd15_path, adapters[which])
    assert type(model.unet).__name__ == "UNetMotionModel"
    flat = UNet2DConditionModel.from_pretrained(sd15_path, subfolder="unet")
    z = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, F, h, w)
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        video = model.unet(z, 500, encoder_hidden_states=text.repeat_interleave(6, 0)).sample
        frames = z[0].permute(1, 0, 2, 3)  # (F, C, h, w)
        alone = flat(frames, 500, encoder_hidden_states=text.expand(6, -1, -1)).sample
    diff = (video[0].permute(1, 0, 2, 3) - alone).abs().max().item()
    if which == "zero":
        assert diff < 1e-5
    else:
        assert diff > 0.1


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, cfg, gamma", [("lcm", 1.0, 0.0), ("lcm", 2.0, 0.0), ("tcd", 2.0, 0.3)]
)
def test_one_window_matches_animatediff_video_to_video(motion_model, kind, cfg, gamma):
    """A clip within one window equals diffusers' AnimateDiffVideoToVideoPipeline at the same
    strength and steps, with explicit height and width (without them it resizes to 256²)."""
    from diffusers import AnimateDiffVideoToVideoPipeline, LCMScheduler, TCDScheduler

    from stylekit.engine.sampling import img2img_schedule

    frames = frames_of(6)
    ours = np.stack(
        list(stream(motion_model, kind=kind, cfg=cfg, gamma=gamma, steps=3).run(frames))
    )
    n, _ = img2img_schedule(3, 0.5)
    pipe_model = motion_model.pipe
    scheduler = (LCMScheduler if kind == "lcm" else TCDScheduler).from_config(
        pipe_model.scheduler.config
    )
    pipe = AnimateDiffVideoToVideoPipeline(
        vae=pipe_model.vae,
        text_encoder=pipe_model.text_encoder,
        tokenizer=pipe_model.tokenizer,
        unet=motion_model.unet,
        motion_adapter=None,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        video=[Image.fromarray(f) for f in frames],
        prompt="a cat",
        num_inference_steps=n,
        strength=0.5,
        guidance_scale=cfg,
        height=48,
        width=64,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
        **({"eta": gamma} if kind == "tcd" else {}),
    ).frames[0]
    assert ours.shape == ref.shape == (6, 48, 64, 3)
    assert np.abs(ours / 255.0 - ref).mean() <= 1 / 255  # uint8 rounding: max 0.5/255
    assert np.abs(ours / 255.0 - ref).max() <= 1 / 255


def inverted_map(net, scale=0.8, end=0.7):
    """A frame → its `Control`: the inverted frame as the map (a map computed per frame), the last
    of 3 steps dropped by `end` (a keep factor of 0)."""
    from PIL import ImageOps

    from stylekit.engine.controlnet import Control, image_tensor

    return lambda image: Control(
        (net,), (image_tensor([ImageOps.invert(image)]),), (scale,), end=end
    )


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_one_window_with_controlnet_matches_animatediff_video_to_video_controlnet(
    motion_model, sd15_controlnet, cfg
):
    """With a ControlNet (non-zero zero-convs) and a map per frame, a clip within one window
    equals diffusers' AnimateDiffVideoToVideoControlNetPipeline (2-D net on the frames' rows,
    text repeated per frame, keep factors per step); the control changes the frames."""
    from diffusers import AnimateDiffVideoToVideoControlNetPipeline, ControlNetModel, LCMScheduler
    from PIL import ImageOps

    from stylekit.engine.sampling import img2img_schedule

    net = ControlNetModel.from_pretrained(sd15_controlnet)
    frames = frames_of(6)
    s = stream(motion_model, cfg=cfg, steps=3)
    s.control = inverted_map(net)
    ours = np.stack(list(s.run(frames)))
    plain = np.stack(list(stream(motion_model, cfg=cfg, steps=3).run(frames)))
    n, _ = img2img_schedule(3, 0.5)
    pipe_model = motion_model.pipe
    pipe = AnimateDiffVideoToVideoControlNetPipeline(
        vae=pipe_model.vae,
        text_encoder=pipe_model.text_encoder,
        tokenizer=pipe_model.tokenizer,
        unet=motion_model.unet,
        motion_adapter=None,
        controlnet=net,
        scheduler=LCMScheduler.from_config(pipe_model.scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        video=[Image.fromarray(f) for f in frames],
        conditioning_frames=[ImageOps.invert(Image.fromarray(f)) for f in frames],
        prompt="a cat",
        num_inference_steps=n,
        strength=0.5,
        guidance_scale=cfg,
        controlnet_conditioning_scale=0.8,
        control_guidance_end=0.7,
        height=48,
        width=64,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).frames[0]
    assert ours.shape == ref.shape == (6, 48, 64, 3)
    assert np.abs(ours / 255.0 - ref).mean() <= 1 / 255  # uint8 rounding: max 0.5/255
    assert np.abs(ours / 255.0 - ref).max() <= 1 / 255
    assert np.abs(ours.astype(int) - plain).mean() > 2  # the residuals reach the motion UNet


def test_windows_read_their_frames_maps(motion_model, sd15_controlnet, monkeypatch):
    """Over several windows each call stacks its own frames' maps in window order, every map is
    computed once per frame, and keep factors follow the window's step."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(sd15_controlnet)
    seen, calls = [], []
    s = stream(motion_model, steps=3, motion=MotionOptions(4, 1))
    make = inverted_map(net)

    def counting(image):
        seen.append(np.asarray(image).copy())
        return make(image)

    s.control = counting
    real = s._window_control

    def recording(frames):
        control = real(frames)
        calls.append(([f.index for f in frames], control))
        return control

    monkeypatch.setattr(s, "_window_control", recording)
    frames = frames_of(9)
    assert len(list(s.run(frames))) == 9
    assert len(seen) == 9 and all(np.array_equal(a, b) for a, b in zip(seen, frames, strict=True))
    assert len(calls) == len(window_spans(9, 4, 1)) * 3
    for index, control in calls:
        expected = torch.cat([make(Image.fromarray(frames[i])).images[0] for i in index])
        assert torch.equal(control.images[0], expected)
        assert [control.factor(t) for t in s.ts] == [1.0, 1.0, 0.0]


# --- windows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 16, 17, 28, 29, 40, 200])
def test_windows_tile_every_frame(frames):
    spans = window_spans(frames, 16, 4)
    covered = np.zeros(frames, int)
    for start, end in spans:
        assert end - start == min(16, frames) and 0 <= start < end <= frames
        covered[start:end] += 1
    assert covered.min() >= 1 and spans[0][0] == 0 and spans[-1][1] == frames
    starts = [s for s, _ in spans]
    assert starts == sorted(set(starts))  # windows move on
    if frames > 16:
        assert all(b - a == 12 for a, b in zip(starts[:-2], starts[1:-1], strict=True))


def test_pyramid_weights():
    assert window_weights(4).tolist() == [1, 2, 2, 1]
    assert window_weights(5).tolist() == [1, 2, 3, 2, 1]
    assert window_weights(16).tolist() == [*range(1, 9), *range(8, 0, -1)]
    assert window_weights(3, "flat").tolist() == [1, 1, 1]


def test_streamed_windows_equal_all_frames_stepped_together(motion_model, monkeypatch):
    """The stream runs windows as soon as their frames are ready; the result equals stepping every
    frame at once with its windows' outputs averaged by the pyramid weights (a reference written
    here), for a clip of 23 frames in windows of 8 overlapping by 3 (a shifted last window)."""
    starts, finals = {}, {}
    real_trajectory = motion_module.trajectory

    def recording(z, ts, sampler, *, noise, after_step=None):
        starts[len(starts)] = (z.clone(), noise)
        return real_trajectory(z, ts, sampler, noise=noise, after_step=after_step)

    monkeypatch.setattr(motion_module, "trajectory", recording)
    monkeypatch.setattr(MotionStream, "_emit", lambda self, f: finals.setdefault(f.index, f.z))

    def mixing(z, t):  # a stand-in model whose output depends on the window's frames
        return 0.5 * z + 0.2 * z.mean(0, keepdim=True) + 1e-4 * t

    s = stream(motion_model, steps=3, motion=MotionOptions(8, 3))  # LCM: re-noises each step
    s._eps = mixing
    s._size = (48, 64)
    assert len(list(s.run(frames_of(23)))) == 23
    spans = window_spans(23, 8, 3)
    assert s.stats.windows == spans == [(0, 8), (5, 13), (10, 18), (15, 23)]

    z = torch.cat([starts[i][0] for i in range(23)])  # (F, C, h, w): every frame in lockstep
    weights = window_weights(8)
    for i, t in enumerate(s.ts):
        total, norm = torch.zeros_like(z), torch.zeros(23, 1, 1, 1)
        for a, b in spans:
            total[a:b] += weights.view(-1, 1, 1, 1) * mixing(z[a:b], t)
            norm[a:b] += weights.view(-1, 1, 1, 1)
        eps = total / norm
        noise = None
        if s.sampler.needs_noise(i, len(s.ts)):
            noise = torch.cat([starts[f][1](i, None) for f in range(23)])
        z = s.sampler.step(eps, s.ts, i, z, noise)
    streamed = torch.cat([finals[i] for i in range(23)])
    assert torch.allclose(streamed, z, atol=1e-6)
    assert s.stats.unet_calls == 4 * 3


def test_memory_stays_one_windows_worth_over_200_frames(motion_model):
    """Over 200 frames the stream holds the latents of a bounded number of frames (the same as
    over 60), every UNet call holds one window, and every frame comes out, in order."""
    peaks = {}
    for count in (60, 200):
        s = stream(motion_model, steps=2)
        frames = frames_of(count, size=(16, 16))
        outs = list(s.run(iter(frames)))
        assert len(outs) == count and outs[0].shape == (16, 16, 3)
        assert s.stats.windows == window_spans(count, 16, 4)
        assert s.stats.unet_calls == 2 * len(s.stats.windows)
        assert s.stats.peak_window == 16
        peaks[count] = s.stats.peak_frames
    assert peaks[200] == peaks[60] <= (2 + 1) * 16  # (steps + 1) windows of latents at most


def test_fixed_noise_repeats_per_window_and_none_draws_on(motion_model):
    """Fixed noise: a static clip gives the same frames in every window position."""
    still = frames_of(1, size=(16, 16))[0]
    fixed = list(stream(motion_model, motion=MotionOptions(4, 0)).run([still] * 8))
    fresh = list(
        stream(motion_model, motion=MotionOptions(4, 0), consistency="none").run([still] * 8)
    )
    for i in range(4):
        assert np.array_equal(fixed[i], fixed[i + 4])
    assert any(not np.array_equal(fresh[i], fresh[i + 4]) for i in range(4))


def test_options_are_checked(motion_model):
    from stylekit.errors import UsageError

    with pytest.raises(UsageError, match="--context-overlap"):
        MotionOptions(8, 8).check()
    with pytest.raises(UsageError, match="motion_max_seq_length"):
        stream(motion_model, motion=MotionOptions(64, 4))
    with pytest.raises(UsageError, match="anchor"):
        stream(motion_model, consistency="anchor")


# --- loading -------------------------------------------------------------------------------------


def test_lora_keys_the_motion_unet_lacks_are_skipped_and_reported(
    sd15_path, sd15_lora, adapters, tmp_path
):
    """A LoRA made for another motion module (STD's video LoRAs) loads what fits and says what
    it skipped; a plain SD1.5 LoRA loads whole into the motion UNet."""
    from safetensors.torch import load_file, save_file

    whole = load(sd15_path, adapters["noisy"], loras=(lora_spec(sd15_lora),))
    report = [n for n in whole.notices if n.startswith("LoRA")]
    assert len(report) == 1 and "layers loaded into the motion UNet" in report[0]
    assert "skipped" not in report[0]

    state = load_file(sd15_lora)
    extra = "unet.down_blocks.0.motion_modules.7.transformer_blocks.0.attn1.to_q.lora.down.weight"
    state[extra] = torch.zeros(4, 32)
    state[extra.replace("lora.down", "lora.up")] = torch.zeros(32, 4)
    foreign = tmp_path / "foreign.safetensors"
    save_file(state, foreign)
    partial = load(sd15_path, adapters["noisy"], loras=(lora_spec(foreign),))
    report = [n for n in partial.notices if n.startswith("LoRA")][0]
    assert "1 skipped" in report and "motion_modules.7" in report
    layers = int(report.split(": ")[1].split()[0])
    assert layers == int(
        [n for n in whole.notices if n.startswith("LoRA")][0].split(": ")[1].split()[0]
    )
    # the loaded layers changed the weights exactly as in the whole load
    a, b = whole.unet.state_dict(), partial.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def lora_spec(path):
    from stylekit.engine.models import LoraSpec

    return LoraSpec(str(path), 1.0)


def test_motion_adapter_that_does_not_fit_is_one_model_error(sdxl_path, adapters):
    from stylekit.errors import ModelError

    with pytest.raises(ModelError, match="motion adapter .* does not fit"):
        load(sdxl_path, adapters["noisy"])


def test_lcm_timestep_scaling_from_the_scheduler_config():
    """MCM's card samples LCM with timestep scaling 4: the sampler takes it from the config."""
    from diffusers import LCMScheduler

    from stylekit.engine.sampling import make_sampler

    config = dict(LCMScheduler(beta_schedule="linear", timestep_scaling=4.0).config)
    sampler = make_sampler("lcm", config)
    assert sampler.timestep_scaling == 4.0
    sched = LCMScheduler.from_config(config)
    sched.set_timesteps(4)
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ts = [int(t) for t in sched.timesteps]
    ours = sampler.step(eps, ts, len(ts) - 1, z)
    sched._step_index = len(ts) - 1
    ref = sched.step(eps, ts[-1], z).prev_sample
    assert torch.allclose(ours, ref, atol=1e-5)


# --- the command line ----------------------------------------------------------------------------


def _ffmpeg(*args):
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(cmd, check=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("motion-clips") / "moving.mp4"
    _ffmpeg(  # odd size, NTSC rate, with audio
        *("-f", "lavfi", "-i", "testsrc2=size=34x26:rate=30000/1001"),
        *("-f", "lavfi", "-t", "0.5", "-i", "sine=frequency=440:sample_rate=44100"),
        *("-vf", "format=rgb24,crop=33:25:0:0", "-frames:v", "11"),
        *("-c:v", "libx264", "-pix_fmt", "yuv444p", "-c:a", "aac", str(path)),
    )
    return path


def test_motion_video_through_the_cli_keeps_size_rate_timestamps_and_audio(
    clip, sd15_path, sd15_ip_adapter, adapters, tmp_path
):
    from stylekit import cli

    ref = tmp_path / "ref.png"
    Image.fromarray(frames_of(1, size=(32, 32))[0]).save(ref)
    out = tmp_path / "styled.mp4"
    args = [str(clip), "--model", str(sd15_path), "--motion-adapter", str(adapters["noisy"])]
    args += ["--context-frames", "4", "--context-overlap", "1", "--accelerator", "none"]
    args += ["--scheduler", "lcm", "--steps", "2", "--strength", "0.5", "--cfg", "1"]
    args += ["--style", str(ref), "--ip-adapter", str(sd15_ip_adapter)]
    args += ["--device", "cpu", "--dtype", "fp32", "--seed", "1", "--json", "-q", "-o", str(out)]
    result = CliRunner().invoke(cli.app, ["video", *args])
    assert result.exit_code == 0, result.output
    record = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    src, got = probe(clip), probe(out)
    assert (got.size, got.frame_count, got.fps) == ((33, 25), 11, Fraction(30000, 1001))
    assert got.audio_codec == "aac" and got.pts == src.pts
    meta = record["settings"]
    assert meta["motion_adapter"] == str(adapters["noisy"]) and meta["windows"] == 4
    assert meta["context_frames"] == 4 and meta["unet_calls"] == 4 * 2
    assert meta["style"] == [str(ref)] and meta["style_mode"] == "ipadapter"
    plain = tmp_path / "plain.mp4"  # the same run without the style reference
    args = args[: args.index("--style")] + args[args.index("--ip-adapter") + 2 :]
    args[-1] = str(plain)
    assert CliRunner().invoke(cli.app, ["video", *args]).exit_code == 0
    styled, unstyled = np.stack(list(read_frames(out))), np.stack(list(read_frames(plain)))
    assert styled.shape == unstyled.shape and np.abs(styled - unstyled.astype(int)).mean() > 2


def test_motion_video_with_canny_control_through_the_cli(
    clip, sd15_path, sd15_controlnet, adapters, tmp_path
):
    """`--motion-adapter … --control canny`: every frame's canny map steers its window's calls;
    size, rate, timestamps and audio are kept and the record names the control."""
    pytest.importorskip("cv2")
    from stylekit import cli

    out, plain = tmp_path / "canny.mp4", tmp_path / "plain.mp4"
    args = [str(clip), "--model", str(sd15_path), "--motion-adapter", str(adapters["noisy"])]
    args += ["--context-frames", "4", "--context-overlap", "1", "--accelerator", "none"]
    args += ["--scheduler", "lcm", "--steps", "2", "--strength", "0.5", "--cfg", "1"]
    args += ["--device", "cpu", "--dtype", "fp32", "--seed", "1", "--json", "-q"]
    control = ["--control", "canny:0.9", "--controlnet", str(sd15_controlnet)]
    result = CliRunner().invoke(cli.app, ["video", *args, *control, "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    src, got = probe(clip), probe(out)
    assert (got.size, got.frame_count, got.fps) == ((33, 25), 11, Fraction(30000, 1001))
    assert got.audio_codec == "aac" and got.pts == src.pts
    meta = record["settings"]
    assert meta["windows"] == 4 and meta["controls"][0]["type"] == "canny"
    assert CliRunner().invoke(cli.app, ["video", *args, "-o", str(plain)]).exit_code == 0
    steered, unsteered = np.stack(list(read_frames(out))), np.stack(list(read_frames(plain)))
    assert steered.shape == unsteered.shape and np.abs(steered - unsteered.astype(int)).mean() > 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--consistency", "anchor"], "anchor"),
        (["--tiled"], "--tiled"),
        (["--skip-similar", "0.9"], "--skip-similar"),
        (["--context-frames", "4", "--context-overlap", "4"], "--context-overlap"),
    ],
)
def test_motion_mode_refuses_what_it_cannot_do(clip, sd15_path, adapters, tmp_path, extra, message):
    from stylekit import cli

    args = [str(clip), "--model", str(sd15_path), "--motion-adapter", str(adapters["noisy"])]
    args += ["-o", str(tmp_path / "x.mp4"), *extra]
    result = CliRunner().invoke(cli.app, ["video", *args])
    assert result.exit_code == 2 and message in result.output


def test_api_records_the_motion_settings(clip, sd15_path, adapters, tmp_path):
    from stylekit.session import Runtime, resolve_settings
    from stylekit.tasks.video import stylize_video

    settings = resolve_settings(
        None,
        None,
        dict(
            model=str(sd15_path),
            motion_adapter=str(adapters["noisy"]),
            accelerator="none",
            scheduler="lcm",
            steps=2,
            strength=0.5,
            cfg=1.0,
            style_mode="none",
        ),
    )
    report = stylize_video(
        [str(clip)],
        settings=settings,
        runtime=Runtime("cpu", "fp32"),
        output=Output(out=tmp_path, seed=1),
        max_frames=7,
        context_frames=4,
        context_overlap=2,
    )
    assert report.exit_code() == 0
    assert probe(tmp_path / "moving.mp4").frame_count == 7


def test_sdxl_motion_unet_streams_with_its_size_ids(sdxl_path, sdxl_controlnet, models_dir):
    """The SDXL layout (3-block adapters without a mid block, like AnimateDiff's SDXL beta):
    its added text/time embeddings reach the motion UNet, and frames come out; an SDXL ControlNet
    gets them repeated per frame row and steers the frames."""
    from diffusers import ControlNetModel

    from stylekit.testing import build_motion_adapter

    adapter = build_motion_adapter(models_dir / "motion-sdxl", family="sdxl")
    model = load(sdxl_path, adapter)
    frames = frames_of(5, (32, 32))
    outs = list(stream(model, cfg=2.0, motion=MotionOptions(4, 1)).run(frames))
    assert len(outs) == 5 and outs[0].shape == (32, 32, 3)
    s = stream(model, cfg=2.0, motion=MotionOptions(4, 1))
    s.control = inverted_map(ControlNetModel.from_pretrained(sdxl_controlnet), end=1.0)
    steered = list(s.run(frames))
    assert np.abs(np.stack(steered).astype(int) - np.stack(outs)).mean() > 1


def test_peft_adapter_folder_loads_with_its_alpha(sd15_path, sd15_lora, adapters, tmp_path):
    """MCM ships a PEFT adapter folder (`base_model.model.` keys, alpha in adapter_config.json):
    it loads like the same LoRA in diffusers' layout at scale lora_alpha / r."""
    from safetensors.torch import load_file, save_file

    peft = {}
    for key, value in load_file(sd15_lora).items():
        key = key.replace("unet.", "base_model.model.", 1)
        peft[key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")] = value
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(peft, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    from stylekit.engine.models import LoraSpec

    ours = load(sd15_path, adapters["noisy"], loras=(LoraSpec(str(folder), 1.0),))
    ref = load(sd15_path, adapters["noisy"], loras=(LoraSpec(str(sd15_lora), 2.0),))
    a, b = ours.unet.state_dict(), ref.unet.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    plain = load(sd15_path, adapters["noisy"]).unet.state_dict()
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_known_motion_checkpoints_set_their_model_cards_scheduler():
    """AnimateLCM samples with linear betas, MCM also with LCM timestep scaling 4: loading them
    by hub id sets the scheduler config the sampler is built from, once per repo."""
    from types import SimpleNamespace

    from diffusers import PNDMScheduler

    from stylekit.engine.models import motion_scheduler
    from stylekit.engine.sampling import make_sampler

    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = SimpleNamespace(scheduler=PNDMScheduler(**sd15))  # SD1.5's config
    lora = "wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors"
    notes = motion_scheduler(pipe, "wangfuyun/AnimateLCM", [lora])
    assert notes == ["motion: beta_schedule linear (the model card of wangfuyun/animatelcm)"]
    sampler = make_sampler("lcm", dict(pipe.scheduler.config))
    linear = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    assert torch.allclose(sampler.ac, linear) and sampler.timestep_scaling == 10.0

    pipe = SimpleNamespace(scheduler=PNDMScheduler())
    mcm = "yhzhai/mcm/animatediff-laion/adapter_model.safetensors"
    motion_scheduler(pipe, "guoyww/animatediff-motion-adapter-v1-5-2", [mcm])
    assert make_sampler("lcm", dict(pipe.scheduler.config)).timestep_scaling == 4.0
    assert motion_scheduler(SimpleNamespace(scheduler=PNDMScheduler()), "/tmp/x", []) == []


def test_windows_longer_than_the_adapter_or_a_missing_adapter_stop_the_batch(
    clip, sd15_path, adapters, tmp_path
):
    from stylekit import cli

    base = [str(clip), "--model", str(sd15_path), "-o", str(tmp_path / "x.mp4"), "--device", "cpu"]
    too_long = ["--motion-adapter", str(adapters["noisy"]), "--context-frames", "40"]
    result = CliRunner().invoke(cli.app, ["video", *base, *too_long, "--accelerator", "none"])
    assert result.exit_code == 2 and "motion_max_seq_length" in result.output
    missing = ["--motion-adapter", str(tmp_path / "nowhere")]
    result = CliRunner().invoke(cli.app, ["video", *base, *missing])
    assert result.exit_code == 2 and "motion adapter" in result.output
    assert not (tmp_path / "x.mp4").exists()


# --- residual CFG and the feature bank in windows -------------------------------------------------


def test_motion_residual_cfg_formulas_against_a_hand_computation(motion_model):
    """One window of 4 frames under CFG 2: `self` is e_u + g (e_c − e_u) with e_u the residual
    noise (z − √ā ref) / √(1 − ā) of each frame's reference latent (ε prediction, δ = 1);
    `initialize` on the window's first step is full CFG and leaves each frame's real clean
    estimate as its reference; `none` is the conditional output."""
    from stylekit.engine.conditioning import encode_text
    from stylekit.engine.motion import motion_predictor
    from stylekit.engine.predict import Residual
    from stylekit.engine.sampling import make_sampler

    model = motion_model
    cond = encode_text(model, "a cat", None, cfg=2.0)
    sampler = make_sampler("lcm", dict(model.pipe.scheduler.config))
    assert cond.do_cfg and sampler.prediction == "epsilon"
    gen = torch.Generator().manual_seed(0)
    z, ref = torch.randn(4, 4, 2, 2, generator=gen), torch.randn(4, 4, 2, 2, generator=gen)
    t = 499

    def unet(kind):  # the motion UNet on the window as one video with conditioning row `kind`
        video = z.permute(1, 0, 2, 3)[None]
        hidden = cond.prompt_embeds[kind : kind + 1].repeat_interleave(4, dim=0)
        with torch.no_grad():
            out = model.unet(video, torch.tensor(t), encoder_hidden_states=hidden).sample
        return out[0].permute(1, 0, 2, 3)  # (F, C, h, w)

    e_u_real, e_c = unet(0), unet(1)
    a = sampler.ac[t]
    stock = (z - a.sqrt() * ref) / (1 - a).sqrt()
    with torch.no_grad():
        eps = {
            m: motion_predictor(model, cond, 16, 16, cfg_mode=m, sampler=sampler)
            for m in ("self", "initialize", "none", "full")
        }
        got_self = eps["self"](z, t, Residual(ref.clone()))
        residual = Residual(ref.clone(), (True,) * 4)
        got_init = eps["initialize"](z, t, residual)
        got_none, got_full = eps["none"](z, t), eps["full"](z, t)
    # 2 video rows vs 1 round differently (~1e-5), and guidance scales that by up to 2g − 1 = 3
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_self, stock + 2.0 * (e_c - stock), **close)
    torch.testing.assert_close(got_full, e_u_real + 2.0 * (e_c - e_u_real), **close)
    torch.testing.assert_close(got_init, got_full, **close)
    x0_u = (z - (1 - a).sqrt() * e_u_real) / a.sqrt()
    torch.testing.assert_close(residual.ref, x0_u, **close)
    torch.testing.assert_close(got_none, e_c, **close)


@pytest.mark.parametrize(
    "mode, per_call",
    [
        ("full", [8, 8, 8, 8]),
        ("self", [4, 4, 4, 4]),
        ("initialize", [8, 8, 4, 4]),
        ("none", [4, 4, 4, 4]),
    ],
)
def test_motion_unet_rows_per_window(motion_model, mode, per_call):
    """Windows of F = 4 frames under CFG: full runs 2F frame rows a call, self and none F,
    initialize 2F on a window's first step and F after; `MotionStats.unet_rows` counts them."""
    calls = []
    hook = motion_model.unet.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].shape[2], args[0].shape[0] * args[0].shape[2]))
    )
    try:
        s = stream(motion_model, cfg=2.0, motion=MotionOptions(4, 1), cfg_mode=mode)
        outs = list(s.run(frames_of(7, size=(16, 16))))
    finally:
        hook.remove()
    assert len(outs) == 7 and s.stats.windows == [(0, 4), (3, 7)]
    assert sorted(rows for _, rows in calls) == sorted(per_call)  # 2 windows × 2 steps
    assert s.stats.unet_rows == sum(per_call) and s.residual == (mode in ("self", "initialize"))
    if mode != "full":  # residual and unguided windows differ from full CFG, reproducibly
        full = list(
            stream(motion_model, cfg=2.0, motion=MotionOptions(4, 1)).run(
                frames_of(7, size=(16, 16))
            )
        )
        again = list(
            stream(motion_model, cfg=2.0, motion=MotionOptions(4, 1), cfg_mode=mode).run(
                frames_of(7, size=(16, 16))
            )
        )
        assert any(not np.array_equal(a, b) for a, b in zip(outs, full, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(outs, again, strict=True))


def test_motion_bank_never_exceeds_its_bound_over_a_long_clip(motion_model):
    """40 random frames in windows of 4 (overlap 1), every window storing into a 2-frame bank with
    merging off (the tiny model's keys are near-identical, see test_video_bank): after every
    output each slot (stage, CFG row, window position, layer) holds at most its bound, and ends
    full. Only the spatial layers bank: the motion modules' temporal attention keeps its own."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(40)]
    opts = dict(consistency="bank", bank_size=2, bank_every=1, bank_merge=None)
    s = stream(motion_model, motion=MotionOptions(4, 1), **opts)
    outputs = 0
    for _ in s.run(frames):
        outputs += 1
        slots = [sl for layers in s._bank.slots.values() for sl in layers.values()]
        assert all(sl.tokens <= sl.bound for sl in slots)
    assert outputs == 40 and len(s.stats.windows) == 13 and s.stats.banked == 13 * 4
    assert all(sl.tokens == sl.bound for sl in slots)
    assert {sl.bound for sl in slots} == {2 * 4, 2 * 1}  # 2x2 and 1x1 latent tokens per frame
    assert s.stats.bank_peak == 2 * 4
    assert {key for key in s._bank.slots} == {(j, 0, p) for j in range(2) for p in range(4)}
    assert not any("motion_modules" in name for name in s._processors)
    assert len(s._processors) == len(
        [
            n
            for n in motion_model.unet.attn_processors
            if n.endswith("attn1.processor") and "motion" not in n
        ]
    )


def test_motion_bank_keeps_a_static_clip_identical_across_windows(motion_model):
    """A still clip in windows of 4 with the bank (fixed noise, repeating per window): window 0
    reads an empty bank, windows 1 and 2 read window 0's k/v at their own positions, which equal
    their own, so the attention output is the same weighted mean. Mathematically the same frames;
    softmax over 2N tokens instead of N rounds differently, hence 1 grey level. A random clip
    shows the bank is read: its later windows differ from fixed noise alone."""
    still = frames_of(1, size=(16, 16))[0]
    outs = list(
        stream(motion_model, motion=MotionOptions(4, 0), consistency="bank").run([still] * 12)
    )
    for i in range(4, 12):
        assert np.abs(outs[i].astype(int) - outs[i % 4]).max() <= 1
    moving = frames_of(8, size=(16, 16))
    noise = list(stream(motion_model, motion=MotionOptions(4, 0)).run(moving))
    bank = list(stream(motion_model, motion=MotionOptions(4, 0), consistency="bank").run(moving))
    assert all(
        np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(noise[:4], bank[:4], strict=True)
    )
    assert any(not np.array_equal(a, b) for a, b in zip(noise[4:], bank[4:], strict=True))


def test_motion_bank_and_self_cfg_through_the_cli_keep_timestamps_and_audio(
    clip, sd15_path, adapters, tmp_path
):
    """The issue's combination, end to end: motion windows, the feature bank and residual CFG
    (`self`: F frame rows a window step instead of 2F), with size, rate, timestamps and audio."""
    from stylekit import cli

    out = tmp_path / "banked.mp4"
    args = [str(clip), "--model", str(sd15_path), "--motion-adapter", str(adapters["noisy"])]
    args += ["--context-frames", "4", "--context-overlap", "1", "--accelerator", "none"]
    args += ["--scheduler", "lcm", "--steps", "2", "--strength", "0.5", "--cfg", "2"]
    args += ["--consistency", "bank", "--bank-size", "2", "--cfg-mode", "self"]
    args += ["--device", "cpu", "--dtype", "fp32", "--seed", "1", "--json", "-q", "-o", str(out)]
    result = CliRunner().invoke(cli.app, ["video", *args])
    assert result.exit_code == 0, result.output
    record = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    src, got = probe(clip), probe(out)
    assert (got.size, got.frame_count, got.fps) == ((33, 25), 11, Fraction(30000, 1001))
    assert got.audio_codec == "aac" and got.pts == src.pts
    meta = record["settings"]
    assert meta["consistency"] == "bank" and meta["bank_size"] == 2
    assert meta["cfg_mode"] == "self" and meta["residual_cfg"] is True
    assert meta["windows"] == 4 and meta["unet_calls"] == 4 * 2
    assert meta["unet_rows"] == 4 * 2 * 4  # F rows per window step: no unconditional video


# --- AD guidance per window ----------------------------------------------------------------------


def ad_references(model, iters=3, adain=False):
    from stylekit.engine import ad

    image = Image.fromarray(frames_of(1, size=(32, 32), seed=9)[0])
    options = ad.ADOptions(iters=iters, lr=0.015, adain=adain, checkpointing=False)
    return ad.make_references(
        model, [image], noise=torch.Generator("cpu").manual_seed(3), options=options
    )


def test_window_ad_refinement_equals_a_hand_written_adam_loop(motion_model):
    """The window's F frames refined jointly through the motion UNet equal a hand loop: Adam on
    the (F, C, h, w) latent, the motion UNet on it as one video, the spatial attn1 layers
    recorded as F frame rows (no motion_modules layer), the AD loss against the noised
    reference run as a 1-frame video, times F; and the loss goes down over the iterations."""
    from stylekit.engine import ad
    from stylekit.engine.ad_loss import ad_loss
    from stylekit.engine.attention import record_attention
    from stylekit.engine.motion_ad import refine_window
    from stylekit.engine.sampling import make_sampler

    model, frames, t = motion_model, 3, 500
    refs = ad_references(model)
    ac = make_sampler("lcm", dict(model.pipe.scheduler.config)).ac
    z = torch.randn(frames, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    got = refine_window(model, refs, ad.FeatureCache(), z, t, ac)

    unet = model.unet
    assert refs.layers and not any("motion_modules" in name for name in refs.layers)
    text = refs.cond.prompt_embeds

    def features(x):  # x (F, C, h, w) as one video
        with record_attention(unet, refs.layers) as store:
            unet(x.permute(1, 0, 2, 3)[None], t, encoder_hidden_states=text.repeat(len(x), 1, 1))
            return dict(store.features)

    with torch.no_grad():
        goal = features(ad.noised(refs, 0, t, ac))
    latent = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([latent], lr=0.015)
    losses = []
    for _ in range(3):
        feats = features(latent)
        assert all(f.q.shape[0] == frames for f in feats.values())  # one row per frame
        loss = ad_loss(feats, goal)
        opt.zero_grad()
        (loss * frames).backward()
        opt.step()
        losses.append(loss.item())
    # 1e-5 (measured 3e-6 on lr 0.015 steps): Adam divides by sqrt(v), so last-bit gradient
    # differences of fp32 summation order on near-zero gradients show up in the step
    assert torch.allclose(got.x, latent.detach(), atol=1e-5)
    assert got.loss == pytest.approx(losses[-1], rel=1e-5)
    assert losses[-1] < losses[0] and (got.x - z).abs().max() > 1e-3


def test_motion_stream_refines_each_frame_once_per_later_step(motion_model):
    """With AD on, every window step after the first refines its frames (a frame shared with an
    earlier window keeps that window's refinement) and the output differs from AD off."""
    from stylekit.engine.ad import FeatureCache
    from stylekit.engine.motion_ad import window_guidance

    refs = ad_references(motion_model, iters=2, adain=True)
    frames = frames_of(6, size=(32, 40))
    plain = stream(motion_model, steps=3, motion=MotionOptions(context=4, overlap=2))
    guided = stream(motion_model, steps=3, motion=MotionOptions(context=4, overlap=2))
    hook = window_guidance(motion_model, refs, FeatureCache(), guided.sampler.ac)
    calls = []

    def counting(z, t, content):
        calls.append((len(z), t))
        return hook(z, t, content)

    guided.guidance = counting
    base, out = np.stack(list(plain.run(frames))), np.stack(list(guided.run(frames)))
    ts = [int(t) for t in guided.ts]
    assert sorted(calls) == sorted((4, t) for t in ts[1:] for _ in range(2))  # 2 windows
    assert out.shape == base.shape and np.abs(out - base.astype(int)).mean() > 1


@pytest.mark.parametrize("mode", ["ad", "both"])
def test_motion_video_with_ad_guidance_through_the_cli_keeps_timestamps_and_audio(
    clip, sd15_path, sd15_ip_adapter, adapters, tmp_path, mode
):
    from stylekit import cli

    ref = tmp_path / "ref.png"
    Image.fromarray(frames_of(1, size=(32, 32))[0]).save(ref)
    out = tmp_path / "ad.mp4"
    args = [str(clip), "--model", str(sd15_path), "--motion-adapter", str(adapters["noisy"])]
    args += ["--context-frames", "4", "--context-overlap", "1", "--accelerator", "none"]
    args += ["--scheduler", "lcm", "--steps", "2", "--strength", "0.5", "--cfg", "1"]
    args += ["--style", str(ref), "--style-mode", mode]
    args += ["--ip-adapter", str(sd15_ip_adapter)] if mode == "both" else []
    args += ["--device", "cpu", "--dtype", "fp32", "--seed", "1", "--json", "-q", "-o", str(out)]
    result = CliRunner().invoke(cli.app, ["video", *args])
    assert result.exit_code == 0, result.output
    record = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    src, got = probe(clip), probe(out)
    assert (got.size, got.frame_count, got.fps) == ((33, 25), 11, Fraction(30000, 1001))
    assert got.audio_codec == "aac" and got.pts == src.pts
    meta = record["settings"]
    assert meta["style_mode"] == mode and meta["ad_iters"] is not None and meta["windows"] == 4
    if mode == "both":
        return
    plain = tmp_path / "plain.mp4"  # the same run without the style reference
    args = args[: args.index("--style")] + args[args.index("--style-mode") + 2 :]
    args[-1] = str(plain)
    assert CliRunner().invoke(cli.app, ["video", *args]).exit_code == 0
    styled, unstyled = np.stack(list(read_frames(out))), np.stack(list(read_frames(plain)))
    assert styled.shape == unstyled.shape and np.abs(styled - unstyled.astype(int)).mean() > 1
