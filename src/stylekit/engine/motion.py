"""Motion-module video: frames denoised jointly by an AnimateDiff motion UNet, in context windows.

See docs/video.md. The UNet is diffusers' `UNetMotionModel` (`models.load_motion_adapter`): its
temporal transformers attend across the frames of one call, so frames are denoised together.

- Context windows: a clip longer than `context` frames runs as windows of `context` frames,
  `overlap` frames shared with the next (starts 0, s, 2s, … with s = context − overlap, plus a
  window on the last `context` frames when the grid misses the end; a shorter clip is one
  window). Where windows overlap, a frame's model output is the weighted mean of the windows'
  outputs, FreeNoise's pyramid weights (1, 2, …, 2, 1) over each window's positions. FreeNoise
  merges inside the temporal attention; merging the whole UNet output instead lets each window
  be one ordinary UNet call, so windows can stream. TCD and LCM steps are affine in (z, ε), so
  stepping a frame with the mean output is the mean of its windows' steps (as in MultiDiffusion).
- Streaming: every frame runs the one sampling loop (`sampling.trajectory`); a window runs step
  j once all its frames are at step j, and a frame takes step j once every window covering it
  has. Window k's last step waits on about `steps` windows ahead, so the latents alive are at
  most (steps + 1) windows' worth and each UNet call holds one window, whatever the clip length
  (`MotionStats.peak_frames`, `peak_window`).
- Noise, as AnimateDiff's video-to-video pipeline draws it for one window from a CPU generator:
  the VAE posterior noise of every frame (F, C, h, w), the start noise (F, C, h, w), then each
  re-noising step's noise drawn as (1, C, F, h, w). A frame takes the noise of its position in
  the first window that holds it. With fixed noise (`consistency="noise"`) every window draws
  from the same seed, so the noise repeats with the window; `"none"` draws on for every window.
- Residual CFG (`cfg_mode`, `predict.residual_uncond`): the window is one video, so `full` runs
  2F frame rows a step, `self` and `none` F, `initialize` 2F on the window's first step (each
  frame keeps the clean estimate of the first window that holds it as its reference).
- Feature bank (`consistency="bank"`, fixed noise too): the bank processors on the spatial
  self-attention layers, where each of the R·F UNet rows is one frame; a frame reads and writes
  the bank of its window position (the noise repeats with the window), at its stage and CFG row
  kind; the first window stores, then one in `bank_every` windows.
- ControlNet (`control`): each frame's maps are computed once, when the frame is encoded, and
  travel with it; a window's call runs the 2-D ControlNet on its R·F frame rows (4-channel
  latents, each frame's maps, the text repeated per frame, as AnimateDiff's ControlNet pipelines
  do) and adds the residuals to the motion UNet's skips, times the step's keep factor.
- AD guidance (`guidance`, `motion_ad.window_guidance`): before a window's step j > 0 its
  frames, all just stepped to t = ts[j], are refined jointly by the motion UNet (AD loss over
  the window's frame rows, the run's iterations and learning rate); a frame that an earlier
  window already refined at this step keeps that result (it takes part in the joint pass but
  its new value is dropped), so each frame is refined once per step, as a per-frame run does,
  except after the last step (no window runs at t = 0). The refined latent is written into the
  tensor the frame's trajectory holds, which the next sampler step reads.
- One window with the whole clip equals `AnimateDiffVideoToVideoPipeline` with explicit
  height and width, and with a ControlNet `AnimateDiffVideoToVideoControlNetPipeline`
  (tests/test_motion.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from stylekit.engine.attention import (
    BankAttnProcessor,
    installed,
    select_layers,
    self_attention_layers,
)
from stylekit.engine.bank import FeatureBank, Row
from stylekit.engine.conditioning import Conditioning, added_kwargs
from stylekit.engine.controlnet import Control
from stylekit.engine.latents import decode, scale_latents, upcast_needed, vae_dtype
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import (
    CFG_MODES,
    Residual,
    cfg_rows,
    expand,
    expand_added,
    pick_added,
    residual_uncond,
)
from stylekit.engine.sampling import Sampler, add_noise, img2img_schedule, trajectory
from stylekit.engine.stream import (
    MULTIPLE,
    StreamOptions,
    StreamStats,
    checked_frame,
    pad_frame,
    to_uint8,
)
from stylekit.errors import UsageError

CONTEXT_FRAMES = 16  # AnimateDiff's training length and FreeNoise's default context
CONTEXT_OVERLAP = 4  # FreeNoise's default context stride of 4 frames, as an overlap
WEIGHTINGS = ("pyramid", "flat")


def motion_predictor(
    model: LoadedModel,
    cond: Conditioning,
    height: int,
    width: int,
    *,
    cfg_mode: str = "full",
    sampler: Sampler | None = None,
    delta: float = 1.0,
) -> Callable[..., torch.Tensor]:
    """Return eps(z, t, residual=None, control=None) for one window's frames z (F, C, h, w): one
    motion-UNet call under CFG.

    The motion UNet takes (R, C, F, h, w), R videos of the window (`predict.cfg_rows` for one
    latent: the window is one video), with text embeddings repeated per frame (as the AnimateDiff
    pipelines pass them); time, SDXL and IP-Adapter embeddings it repeats itself. `cfg_mode` as in
    `predict.noise_predictor`: `self` and `initialize` take e_u from `residual` (one reference
    clean latent per frame), `initialize` runs the unconditional video for real when
    `residual.real` marks the frames. `control` (the window's ControlNets, one map per frame or
    one for all, `Control.scheduled`) runs on the R·F frame rows, video-major as the motion UNet
    flattens them, and its residuals go to the UNet's skips.
    """
    if cfg_mode not in CFG_MODES:
        raise UsageError(f"unknown cfg mode {cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
    added = added_kwargs(model, cond, height, width)
    unet = model.unet

    def eps(
        z: torch.Tensor, t: int, residual: Residual | None = None, control: Control | None = None
    ) -> torch.Tensor:
        frames = z.shape[0]
        real = (all(residual.real),) if residual is not None and residual.real else ()
        kind = torch.tensor([k for _, k in cfg_rows(1, cond, cfg_mode, real)], device=z.device)
        video = z.permute(1, 0, 2, 3)[None]  # (1, C, F, h, w)
        hidden = expand(cond.prompt_embeds[kind], frames)  # (R·F, 77, D)
        more = pick_added(added, kind)
        residuals = {}
        if control is not None:  # the 2-D nets on the R·F frame rows: row r·F + f is frame f
            position = torch.arange(frames, device=z.device).repeat(len(kind))
            residuals = control.for_rows(position).residuals(
                z[position], t, hidden, expand_added(more, frames)
            )
        out = unet(
            torch.cat([video] * len(kind)),  # (R, C, F, h, w), uncond first
            torch.as_tensor(t, device=z.device),
            encoder_hidden_states=hidden,
            timestep_cond=cond.timestep_cond,
            added_cond_kwargs=more,
            return_dict=False,
            **residuals,
        )[0].permute(0, 2, 1, 3, 4)  # (R, F, C, h, w)
        e_c = out[-1]
        if not cond.do_cfg or cfg_mode == "none":
            return e_c
        e_u = out[0]
        if cfg_mode != "full":
            real_u = out[:-1].reshape(-1, *e_c.shape[1:])  # (F or 0, C, h, w)
            e_u = residual_uncond(z, t, real_u, residual, sampler, delta)
        return e_u + cond.cfg * (e_c - e_u)

    return eps


def window_weights(length: int, weighting: str = "pyramid") -> torch.Tensor:
    """FreeNoise's per-position weights: pyramid 1, 2, …, 2, 1 (peak in the middle) or flat."""
    if weighting == "flat":
        return torch.ones(length)
    if weighting != "pyramid":
        raise UsageError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    half = list(range(1, (length + 1) // 2 + 1))
    return torch.tensor(half + half[: length // 2][::-1], dtype=torch.float32)


def window_spans(frames: int, context: int, overlap: int) -> list[tuple[int, int]]:
    """The [start, end) windows over `frames` frames (what `MotionStream` runs, in order)."""
    if frames <= context:
        return [(0, frames)]
    stride = context - overlap
    spans = [(i, i + context) for i in range(0, frames - context + 1, stride)]
    if spans[-1][1] < frames:
        spans.append((frames - context, frames))
    return spans


@dataclass(frozen=True)
class MotionOptions:
    """How frames share windows; each default carries its reason."""

    context: int = CONTEXT_FRAMES
    overlap: int = CONTEXT_OVERLAP
    weighting: str = "pyramid"  # FreeNoise's default

    def check(self, max_frames: int | None = None) -> MotionOptions:
        """Raise a UsageError naming the bad value (a window longer than the adapter's positions)."""
        if self.context < 1:
            raise UsageError(f"--context-frames must be at least 1, got {self.context}")
        if max_frames is not None and self.context > max_frames:
            raise UsageError(
                f"--context-frames {self.context} exceeds the motion adapter's "
                f"{max_frames} positions (motion_max_seq_length)"
            )
        if not 0 <= self.overlap < self.context:
            raise UsageError(
                f"--context-overlap must be in 0..{self.context - 1} (below --context-frames), "
                f"got {self.overlap}"
            )
        window_weights(1, self.weighting)
        return self


@dataclass
class MotionStats(StreamStats):
    """`StreamStats` plus the windows run and what was held in memory at most."""

    windows: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in order
    unet_rows: int = 0  # frame rows through the UNet (× 2 under CFG)
    peak_frames: int = 0  # frame latents alive at once
    peak_window: int = 0  # frames in one UNet call


@dataclass
class _Frame:
    """One frame on its way: its trajectory and the window outputs gathered for its next step."""

    index: int
    run: Generator
    pending: tuple[torch.Tensor, int] | None
    windows: int = 0  # windows that hold this frame
    final: bool = False  # no later window can hold it
    step: int = 0
    total: torch.Tensor | None = None  # Σ weight · output at this step
    weight: float = 0.0
    votes: int = 0  # windows that gave their output at this step
    z: torch.Tensor | None = None  # the final latent
    ref: torch.Tensor | None = None  # residual CFG: the reference clean latent (`Residual.ref`)
    initialized: bool = False  # `initialize`: ref is the first window's real uncond estimate
    control: Control | None = None  # its ControlNet maps, scheduled over the trajectory
    content: tuple[torch.Tensor, torch.Tensor] | None = None  # AD: (z0, start noise)
    refined: int = 0  # AD: the last step at which a window refined it

    def gather(self, out: torch.Tensor, weight: float) -> None:
        self.total = weight * out if self.total is None else self.total + weight * out
        self.weight += weight
        self.votes += 1
        if self.final and self.votes == self.windows:
            self.send()

    def send(self) -> None:
        """All windows gave their output: step with their weighted mean."""
        mean, self.total, self.weight, self.votes = self.total / self.weight, None, 0.0, 0
        try:
            self.pending = self.run.send(mean)
        except StopIteration as done:
            self.z, self.pending = done.value, None
        self.step += 1


@dataclass
class _Window:
    start: int
    frames: list[_Frame]
    step: int = 0
    writes: bool = False  # its frames store their k/v into the bank

    def ready(self) -> bool:
        return all(f.pending is not None and f.step == self.step for f in self.frames)


class MotionStream:
    """Stylise a stream of frames with a motion UNet: `for out in stream.run(frames)` yields one
    uint8 frame per input, in order, a few windows late. Build one per video."""

    batched = False  # the windows are the batch (`video_settings` reads this)

    def __init__(
        self,
        model: LoadedModel,
        cond: Conditioning,
        sampler: Sampler,
        options: StreamOptions,
        motion: MotionOptions = MotionOptions(),
        *,
        control: Callable[[Image.Image], Control] | None = None,
        guidance: Callable[..., torch.Tensor] | None = None,
    ):
        if options.consistency == "anchor":
            raise UsageError(
                "--consistency anchor has no motion mode (the motion module mixes frames "
                "itself); use bank, noise or none"
            )
        self.model, self.cond, self.sampler, self.options = model, cond, sampler, options.check()
        positions = getattr(model.unet.config, "motion_max_seq_length", None)
        if positions is None:
            raise UsageError("the model's UNet has no motion module; load one (--motion-adapter)")
        self.motion = motion.check(positions)
        _, self.ts = img2img_schedule(options.steps, options.strength, turbo=model.turbo)
        self.weights = window_weights(motion.context, motion.weighting)
        self.control = control  # a frame's ControlNet maps, computed once per frame
        self.guidance = guidance  # AD: refine(z (F, C, h, w), t, (z0, noise)) for a window
        self.stats = MotionStats()
        self._generator = torch.Generator("cpu").manual_seed(options.seed)
        self._eps: Callable[..., torch.Tensor] | None = None
        self._size: tuple[int, int] | None = None
        self._emitted = 0  # frames yielded so far
        self.residual = options.residual_cfg(cond)
        self._bank: FeatureBank | None = None
        self._processors: dict[str, BankAttnProcessor] = {}
        self._opened = 0  # windows opened so far
        self._writer: int | None = None  # the index of the last window that stored into the bank
        if options.consistency == "bank":
            self._bank = FeatureBank(size=options.bank_size, merge=options.bank_merge)
            unet = model.unet
            layers = select_layers(unet, options.anchor_layers or len(self_attention_layers(unet)))
            self._processors = {name: BankAttnProcessor(name, self._bank) for name in layers}

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Yield one (H, W, 3) uint8 output per (H, W, 3) uint8 input, in order, streaming."""
        context, stride = self.motion.context, self.motion.context - self.motion.overlap
        buffer: list[tuple[int, np.ndarray]] = []  # arrived frames no window holds yet
        alive: dict[int, _Frame] = {}  # started frames not yet emitted, by index
        windows: list[_Window] = []
        count, next_start = 0, 0
        for index, frame in enumerate(frames):
            buffer.append((index, self._check(frame)))
            count = index + 1
            if count == next_start + context:
                windows.append(self._open(next_start, count, buffer, alive))
                next_start += stride
                yield from self._pump(windows, alive)
        if count and (not windows or windows[-1].start + len(windows[-1].frames) < count):
            windows.append(self._open(max(count - context, 0), count, buffer, alive))
        self._finalise(alive.values())
        yield from self._pump(windows, alive)

    # --- windows -------------------------------------------------------------------------------

    @torch.no_grad()
    def _open(self, start: int, end: int, buffer: list, alive: dict[int, _Frame]) -> _Window:
        """Open the window [start, end): its new frames are encoded and noised; frames before
        `start` can be in no later window (windows only move on)."""
        self._finalise(f for f in alive.values() if f.index < start)
        new = [(i, f) for i, f in buffer if start <= i < end]
        del buffer[: len(new)]
        if new:
            alive.update(self._start(start, end - start, new))
        frames = [alive[i] for i in range(start, end)]
        for frame in frames:
            frame.windows += 1
        self.stats.windows.append((start, end))
        self.stats.peak_frames = max(self.stats.peak_frames, len(alive))
        window = _Window(start, frames, writes=self._writes(self._opened))
        self._opened += 1
        return window

    def _writes(self, index: int) -> bool:
        """Bank mode: the first window stores into the bank, then one every `bank_every` windows
        (0: the first only)."""
        if self._bank is None:
            return False
        every = self.options.bank_every
        if self._writer is None or (every and index - self._writer >= every):
            self._writer = index
            return True
        return False

    @staticmethod
    def _finalise(frames: Iterable[_Frame]) -> None:
        """Mark frames as held by no further window; those with every window's output step."""
        for frame in frames:
            if not frame.final:
                frame.final = True
                if frame.votes and frame.votes == frame.windows:
                    frame.send()

    def _pump(self, windows: list[_Window], alive: dict[int, _Frame]) -> Iterator[np.ndarray]:
        """Run every window that is ready (earliest first) until none is; yield finished frames."""
        while True:
            window = next((w for w in windows if w.ready()), None)
            if window is None:
                return
            self._run(window)
            windows[:] = [w for w in windows if w.step < len(self.ts)]
            while self._emitted in alive and alive[self._emitted].pending is None:
                frame = alive.pop(self._emitted)
                self._emitted += 1
                yield self._emit(frame)

    @torch.no_grad()
    def _run(self, window: _Window) -> None:
        """One UNet call on the window's frames; each frame gathers its weighted output."""
        frames = window.frames
        t = frames[0].pending[1]
        if self.guidance is not None and window.step > 0:
            self._refine(window, t)
        z = torch.cat([f.pending[0] for f in frames])  # (F, C, h, w), all at step j
        o = self.options
        if self._eps is None:
            h, w = self._padded
            self._eps = motion_predictor(
                self.model,
                self.cond,
                h,
                w,
                cfg_mode=o.cfg_mode,
                sampler=self.sampler,
                delta=o.cfg_delta,
            )
        first = o.cfg_mode == "initialize" and window.step == 0  # the window's first step
        plan = cfg_rows(1, self.cond, o.cfg_mode, (first,))  # (0, kind) per video row
        residual = None
        if self.residual:
            residual = Residual(torch.cat([f.ref for f in frames]), (first,) * len(frames))
        with self._attention(window, plan):
            more = {} if residual is None else {"residual": residual}
            control = self._window_control(frames)
            more |= {} if control is None else {"control": control}
            out = self._eps(z, t, **more)
        if residual is not None and first:  # a frame keeps its first window's estimate
            for position, frame in enumerate(frames):
                if not frame.initialized:
                    frame.ref, frame.initialized = residual.ref[position : position + 1], True
        rows = len(frames) * len(plan)
        self.stats.unet_calls += 1
        self.stats.unet_rows += rows
        self.stats.peak_window = max(self.stats.peak_window, len(window.frames))
        window.step += 1
        for position, frame in enumerate(window.frames):
            frame.gather(out[position : position + 1], float(self.weights[position]))

    def _refine(self, window: _Window, t: int) -> None:
        """AD: refine the window's frames jointly at t; write each frame not yet refined at this
        step into the latent its trajectory holds (the pending tensor is that latent)."""
        frames = window.frames
        z = torch.cat([f.pending[0] for f in frames])
        content = None
        if frames[0].content is not None:
            content = tuple(
                torch.cat(parts) for parts in zip(*[f.content for f in frames], strict=True)
            )
        with torch.inference_mode(False):
            refined = self.guidance(z, t, content)
        for position, frame in enumerate(frames):
            if frame.refined < window.step:
                frame.pending[0].copy_(refined[position : position + 1])
                frame.refined = window.step

    @staticmethod
    def _window_control(frames: list[_Frame]) -> Control | None:
        """The window's ControlNet maps: each net's frame maps stacked in window order."""
        if frames[0].control is None:
            return None
        stacked = zip(*[f.control.images for f in frames], strict=True)  # per net: each frame's
        return replace(frames[0].control, images=tuple(torch.cat(ims) for ims in stacked))

    @contextlib.contextmanager
    def _attention(self, window: _Window, plan) -> Iterator[None]:
        """Bank mode: the bank processors for one call, told each UNet row's slot. The spatial
        layers see the window's R videos as R·F frame rows (video-major); a frame reads and
        writes the bank of its window position (whose noise it shares, the noise repeating with
        the window), at its stage and CFG row kind."""
        if self._bank is None:
            yield
            return
        self._bank.set_rows(
            Row((window.step, kind, position), frame.index, window.writes)
            for _, kind in plan
            for position, frame in enumerate(window.frames)
        )
        with installed(self.model.unet, self._processors):
            yield
        self.stats.bank_peak = self._bank.peak
        if window.writes and window.step == 0:
            self.stats.banked += len(window.frames)

    # --- frames in -----------------------------------------------------------------------------

    def _check(self, frame: np.ndarray) -> np.ndarray:
        frame, self._size = checked_frame(frame, self._size)
        self.stats.frames += 1
        self.stats.processed += 1
        return frame

    @property
    def _padded(self) -> tuple[int, int]:
        h, w = self._size
        return -(-h // MULTIPLE) * MULTIPLE, -(-w // MULTIPLE) * MULTIPLE

    def _start(self, start: int, length: int, new: list) -> dict[int, _Frame]:
        """Encode the new frames and start their trajectories with their window positions' noise."""
        pixels = torch.cat([to_tensor_np(pad_frame(f)) for _, f in new])  # (n, 3, H, W)
        positions = [i - start for i, _ in new]
        noise = self._window_noise(length, pixels)
        posterior = None if noise.posterior is None else noise.posterior[positions]
        z0 = encode_frames(self.model, pixels, posterior)
        started = {}
        for row, ((index, frame), p) in enumerate(zip(new, positions, strict=True)):
            steps = noise.steps
            run = trajectory(
                add_noise(z0[row : row + 1], noise.start[p : p + 1], self.ts[0], self.sampler.ac),
                self.ts,
                self.sampler,
                noise=lambda i, eps, p=p, steps=steps: steps[i][p : p + 1],
            )
            started[index] = _Frame(index, run, next(run))
            if self.control is not None:  # its maps, from the padded frame as it is encoded
                image = Image.fromarray(pad_frame(frame))
                started[index].control = self.control(image).scheduled(self.ts)
            if self.residual:  # `self`: the frame's own encoded latent
                started[index].ref = z0[row : row + 1]
            if self.guidance is not None:  # AD's content term: z0 noised with its start noise
                started[index].content = (z0[row : row + 1], noise.start[p : p + 1])
        return started

    def _window_noise(self, length: int, pixels: torch.Tensor) -> WindowNoise:
        """One window's noise in the video pipeline's order (fixed noise: the same every window)."""
        generator = self._generator
        if self.options.consistency != "none":  # fixed noise (noise, bank)
            generator = torch.Generator("cpu").manual_seed(self.options.seed)
        h, w = pixels.shape[-2] // MULTIPLE, pixels.shape[-1] // MULTIPLE
        channels = self.model.vae.config.latent_channels
        dtype, device = self.model.dtype, self.model.device

        def randn(shape):
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        posterior = randn((length, channels, h, w)) if kl_vae(self.model) else None
        start = randn((length, channels, h, w))  # (1, F, C, h, w) in the pipeline
        n = len(self.ts)
        steps = [  # drawn (1, C, F, h, w) by the schedulers, after each model call
            randn((1, channels, length, h, w))[0].transpose(0, 1)
            if self.sampler.needs_noise(i, n)
            else None
            for i in range(n)
        ]
        return WindowNoise(posterior, start, steps)

    # --- frames out ----------------------------------------------------------------------------

    @torch.no_grad()
    def _emit(self, frame: _Frame) -> np.ndarray:
        h, w = self._size
        return to_uint8(decode(self.model, frame.z)[0])[:h, :w]


@dataclass
class WindowNoise:
    posterior: torch.Tensor | None  # (F, C, h, w): the VAE posterior samples' noise (KL VAE)
    start: torch.Tensor  # (F, C, h, w)
    steps: list[torch.Tensor | None]  # per step, (F, C, h, w) or None where no noise is added


def to_tensor_np(frame: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 in [−1, 1], as `latents.to_tensor` computes it."""
    arr = frame.astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0  # (1, 3, H, W)


def kl_vae(model: LoadedModel) -> bool:
    """Whether the VAE samples a posterior (AutoencoderKL), unlike a tiny VAE."""
    return hasattr(model.vae, "quant_conv") or type(model.vae).__name__ == "AutoencoderKL"


@torch.no_grad()
def encode_frames(model: LoadedModel, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """(n, 3, H, W) pixels → scaled latents, a KL VAE's posterior sampled with the given noise
    (mean + std · noise, as `latent_dist.sample` draws it); one frame at a time."""
    vae = model.vae
    dtype = torch.float32 if upcast_needed(model) else vae.dtype
    rows = []
    with vae_dtype(vae, dtype):
        x = x.to(device=model.device, dtype=dtype)
        for i in range(x.shape[0]):
            out = vae.encode(x[i : i + 1])
            if noise is None:
                rows.append(out.latents)
                continue
            dist = out.latent_dist
            rows.append(dist.mean + dist.std * noise[i : i + 1].to(dist.mean.dtype))
    return scale_latents(vae, torch.cat(rows).to(model.dtype))
