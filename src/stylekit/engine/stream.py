"""Stylise video frame by frame with one model and one conditioning (StreamDiffusion's ideas).

See docs/video.md (StreamDiffusion, Kodaira et al. 2023, arXiv 2312.12491; the feature bank
of StreamV2V, Liang et al. 2024, arXiv 2405.15757):

- Fixed noise (`consistency="noise"`): one seeded noise tensor per denoising stage, drawn once
  and reused for every frame, so a region that does not change is denoised the same way.
  `"none"` draws fresh noise for every frame (flickers); `"bank"` is fixed noise plus
  self-attention that also attends to a bounded bank of past frames' k/v at the same stage
  (`engine/bank.py`); `"anchor"` is that bank holding one frame, replaced every `anchor_every`.
- Residual CFG (`cfg_mode`, StreamDiffusion): `full` runs an unconditional row per frame and
  stage, `self` approximates it from the residual noise (no extra row), `initialize` runs the
  real one at the first stage only, `none` does not guide (`predict.noise_predictor`).
- Stochastic similarity filter: skip a frame with probability
  max(0, 1 − (1 − c) / (1 − threshold)), c the cosine similarity to the last processed input;
  a skipped frame repeats the last output; after `max_skip` skips in a row one goes through.
- Stream batch: the UNet batch holds one latent per stage in flight; every new frame enters at
  the first stage while older ones advance one, and outputs come out `stages − 1` frames late.
  Same frames as sequential processing (the math per frame is identical, batched matmuls may
  round differently); on by default on CPU and CUDA. It pays on a CPU too: 4 rows of the SD1.5
  UNet at 256 px in bf16 took 0.63× the time of 4 single calls (1 thread), and a moving clip ran
  1.51× the naive loop's frame rate with it vs 1.01× without (benchmarks/README.md). Every frame
  runs the one sampling loop (`sampling.trajectory`); stream batch only batches their model calls.

Decisions:
- Noise is drawn the way `img2img` draws it (a CPU generator seeded once: the VAE posterior
  sample, the start noise, then each re-noising step's noise), so with fixed noise the first
  frame equals the still-image result for the same seed, and every later frame reuses the
  posterior noise and the stage noises of the first.
- The similarity filter compares with the last *processed* input (as StreamDiffusion does), so
  slow drift cannot hide behind frame-to-frame similarity, on [−1, 1] pixels in float64.
- The bank is kept per stage (and CFG row kind): a frame at stage j reads what earlier frames
  stored at stage j, then stores its own. In stream batch the frame ahead always reaches a stage
  one call earlier, so the banks evolve exactly as on the sequential path.
- Sizes that are not multiples of 8 are reflect-padded before encoding and cropped back after
  decoding: the output has exactly the input's size.
- AD guidance (style mode ad/both) refines each frame after each step, as for a still image
  (`guidance` gives each frame its hook); the run caches the reference features per
  timestep, so they are computed once per run.
- ControlNet (`control`): each frame's maps are computed as it arrives and travel with it
  through the stages, so a stream-batch call stacks its rows' maps (docs/controlnet.md).
- Full resolution (`windows`, `--tiled`): every frame runs at its own size over MultiDiffusion
  windows (ε averaged over them, AD refining each) with the tiled VAE in and out, as tiled
  img2img does for a still image. Frames then go one at a time (no stream batch: the windows
  are the UNet batch); the bank and residual CFG are refused (their features and latents would
  be one window's).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

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
from stylekit.engine.conditioning import Conditioning
from stylekit.engine.controlnet import Control
from stylekit.engine.latents import decode, encode
from stylekit.engine.models import LoadedModel
from stylekit.engine.predict import CFG_MODES, Residual, cfg_rows, noise_predictor
from stylekit.engine.sampling import Guidance, Sampler, add_noise, img2img_schedule, trajectory
from stylekit.errors import UsageError

if TYPE_CHECKING:
    from stylekit.engine.windows import Windows

CONSISTENCY = ("none", "noise", "anchor", "bank")
MULTIPLE = 8  # the VAE's downsampling factor: latent sizes need pixel sizes divisible by it


@dataclass(frozen=True)
class StreamOptions:
    """How a video is stylised; each default carries its reason."""

    steps: int = 4  # NFE per frame (every frame runs all stages)
    strength: float = 0.5
    consistency: str = "noise"  # fixed noise: static regions stay still at no extra cost
    anchor_every: int = 30  # new anchor about once a second at 30 fps; 0: the first frame only
    anchor_layers: int | Sequence[str] | None = None  # None: the last 6 (anchor), all (bank)
    bank_size: int = 1  # frames' worth of k/v per layer and stage (StreamV2V's cache_maxframes)
    bank_every: int = 4  # one frame in 4 stores into the bank (StreamV2V's cache_interval)
    bank_merge: float | None = 0.98  # cosine above which a new token merges (StreamV2V's 0.98)
    cfg_mode: str = "full"  # full | self | initialize | none (StreamDiffusion's cfg_type)
    cfg_delta: float = 1.0  # residual CFG's δ: e_u = δ · ε̄ (StreamDiffusion's default)
    skip_similar: float | None = None  # None: process every frame; StreamDiffusion uses 0.98
    max_skip: int = 10  # StreamDiffusion's max_skip_frame
    stream_batch: bool | None = None  # None: on for CPU and CUDA, off on MPS (untested there)
    seed: int = 0

    def residual_cfg(self, cond: Conditioning) -> bool:
        """Whether the unconditional prediction comes from the residual noise (`self`,
        `initialize`): only under CFG, where there is an unconditional prediction to make."""
        return self.cfg_mode in ("self", "initialize") and cond.do_cfg

    def check(self) -> StreamOptions:
        """Raise a UsageError naming the bad option and the allowed values."""
        if self.consistency not in CONSISTENCY:
            raise UsageError(
                f"unknown consistency {self.consistency!r}; choose one of {', '.join(CONSISTENCY)}"
            )
        if self.cfg_mode not in CFG_MODES:
            raise UsageError(
                f"unknown cfg mode {self.cfg_mode!r}; choose one of {', '.join(CFG_MODES)}"
            )
        if self.bank_size < 1 or self.bank_every < 0:
            raise UsageError(
                f"bank_size must be >= 1 and bank_every >= 0, got {self.bank_size}, "
                f"{self.bank_every}"
            )
        if self.bank_merge is not None and not 0.0 < self.bank_merge <= 1.0:
            raise UsageError(f"bank_merge must be in (0, 1], got {self.bank_merge}")
        if self.anchor_every < 0:
            raise UsageError(
                f"anchor_every must be >= 0 (0: never refresh), got {self.anchor_every}"
            )
        if self.skip_similar is not None and not 0.0 < self.skip_similar < 1.0:
            raise UsageError(f"skip_similar must be in (0, 1), got {self.skip_similar}")
        if self.max_skip < 0:
            raise UsageError(f"max_skip must be >= 0, got {self.max_skip}")
        return self


@dataclass
class StreamStats:
    """What a stream did: frames in, frames run through the UNet, frames skipped, UNet calls."""

    frames: int = 0
    processed: int = 0
    skipped: int = 0
    banked: int = 0  # frames that stored their k/v into the bank (anchor, bank)
    unet_calls: int = 0
    unet_rows: int = 0  # latent rows through the UNet (a CFG row counts; tiled: not counted)
    bank_peak: int = 0  # the most tokens one bank slot held (bounded by bank_size · N)


class SimilarityFilter:
    """StreamDiffusion's stochastic similarity filter, with a seeded RNG."""

    def __init__(self, threshold: float, max_skip: int, seed: int):
        self.threshold, self.max_skip = threshold, max_skip
        self.rng = np.random.default_rng(seed)
        self.reference: np.ndarray | None = None  # the last processed input, flat, in [−1, 1]
        self.skips = 0

    def skip(self, frame: np.ndarray) -> bool:
        """Whether to skip `frame` (then the caller repeats the last output)."""
        x = frame.reshape(-1).astype(np.float64) / 127.5 - 1.0
        if self.reference is not None and self.skips < self.max_skip:
            c = float(np.dot(x, self.reference))
            c /= max(float(np.linalg.norm(x) * np.linalg.norm(self.reference)), 1e-12)
            p = max(0.0, 1.0 - (1.0 - min(c, 1.0)) / (1.0 - self.threshold))
            if self.rng.random() < p:
                self.skips += 1
                return True
        self.skips = 0
        self.reference = x
        return False


def checked_frame(frame, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The frame as an (H, W, 3) uint8 array, and the stream's frame size (the first frame's);
    anything else, or a frame of another size, is a ValueError."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    if size is not None and frame.shape[:2] != size:
        raise ValueError(f"frame size {frame.shape[:2]} differs from the first {size}")
    return frame, frame.shape[:2]


def pad_frame(frame: np.ndarray, multiple: int = MULTIPLE) -> np.ndarray:
    """Reflect-pad an (H, W, 3) frame at the bottom and right to multiples of `multiple`."""
    h, w = frame.shape[:2]
    pad = ((0, -h % multiple), (0, -w % multiple), (0, 0))
    return frame if pad[0][1] == pad[1][1] == 0 else np.pad(frame, pad, mode="reflect")


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] → uint8, rounding like diffusers' numpy_to_pil."""
    return (arr * 255).round().astype(np.uint8)


@dataclass
class _Item:
    """One input frame on its way through the stages; a skipped frame carries no latent."""

    index: int
    skip: bool = False
    run: Generator | None = None  # its `sampling.trajectory`
    pending: tuple[torch.Tensor, int] | None = None  # (z (1, 4, h, w), t) of the next model call
    z: torch.Tensor | None = None  # the final latent, once every stage ran
    stage: int = 0
    writes: bool = False  # this frame stores its k/v into the bank
    ref: torch.Tensor | None = None  # residual CFG: the reference clean latent (`Residual.ref`)
    control: Control | None = None  # its ControlNet maps (`FrameStream(control=)`)

    def send(self, eps: torch.Tensor) -> None:
        """Give the trajectory its model output; it steps to the next call or ends."""
        try:
            self.pending = self.run.send(eps)
        except StopIteration as done:
            self.z, self.pending = done.value, None
        self.stage += 1


class FrameStream:
    """Stylise a stream of frames: `for out in stream.run(frames)` yields one uint8 frame per input.

    Build one per video (it holds the video's noise, anchor and filter state); the model and
    conditioning are shared. Close the generator if you stop early (it restores the UNet's
    attention processors).
    """

    def __init__(
        self,
        model: LoadedModel,
        cond: Conditioning,
        sampler: Sampler,
        options: StreamOptions,
        *,
        guidance: Guidance | None = None,
        windows: Windows | None = None,
        control: Callable[[Image.Image], Control] | None = None,
    ):
        self.model, self.cond, self.sampler, self.options = model, cond, sampler, options.check()
        self.control = control  # a frame's ControlNet maps, computed per frame as it arrives
        self.guidance = guidance  # AD: each frame's after_step, from its z0 and start noise
        self.windows = windows  # full resolution: the (padded) frame's MultiDiffusion windows
        _, self.ts = img2img_schedule(options.steps, options.strength, turbo=model.turbo)
        batched = options.stream_batch
        if windows is not None:
            if batched:
                raise UsageError(
                    "--tiled runs frames one at a time (the windows are the batch); "
                    "drop --stream-batch"
                )
            if options.consistency in ("anchor", "bank"):
                raise UsageError(
                    f"--consistency {options.consistency} has no --tiled (its attention "
                    "features are one window's); use --consistency noise"
                )
            if options.cfg_mode in ("self", "initialize"):
                raise UsageError(f"--cfg-mode {options.cfg_mode} has no --tiled; use full")
            batched = False
        self.batched = model.device.type in ("cpu", "cuda") if batched is None else batched
        self.fixed = options.consistency != "none"
        self.stats = StreamStats()
        self.filter = None
        if options.skip_similar is not None:
            self.filter = SimilarityFilter(options.skip_similar, options.max_skip, options.seed)
        self._generator = torch.Generator("cpu").manual_seed(options.seed)
        self._noises: list[torch.Tensor | None] | None = None  # the fixed noise, once drawn
        self._bank: FeatureBank | None = None  # anchor and bank modes
        self._processors: dict[str, BankAttnProcessor] = {}
        self._writer: int | None = None  # the index of the last frame that stored into the bank
        self.residual = options.residual_cfg(cond)
        self._size: tuple[int, int] | None = None  # (H, W) of the input frames
        self._eps = None
        self._last: np.ndarray | None = None

    @property
    def delay(self) -> int:
        """How many frames late outputs come out (stream batch), 0 when sequential."""
        return len(self.ts) - 1 if self.batched else 0

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Yield one (H, W, 3) uint8 output per (H, W, 3) uint8 input, in order, streaming."""
        if self.options.consistency in ("anchor", "bank"):
            self._install_bank()
        items = (self._arrive(i, frame) for i, frame in enumerate(frames))
        flow = self._pipeline(items) if self.batched else self._sequential(items)
        for item in flow:
            yield self._emit(item)

    # --- one frame in --------------------------------------------------------------------------

    @torch.no_grad()
    def _arrive(self, index: int, frame: np.ndarray) -> _Item:
        """Check the frame, decide whether to skip it, else encode and noise it to the first stage."""
        frame = self._check(frame)
        self.stats.frames += 1
        if self.filter is not None and self.filter.skip(frame):
            self.stats.skipped += 1
            return _Item(index, skip=True)
        self.stats.processed += 1
        image = Image.fromarray(pad_frame(frame))
        if self._eps is None:
            self._eps = self._predictor(image)
        z0, noises = self._encode(image)
        control = self.control(image).scheduled(self.ts) if self.control is not None else None
        after = None
        if self.guidance is not None:
            tiles = {} if self.windows is None else self.windows.guidance_args
            tiles |= {"control": control} if control is not None else {}
            after = self.guidance(self.ts, z0=z0, noise=noises[0], **tiles)
        run = trajectory(
            add_noise(z0, noises[0], self.ts[0], self.sampler.ac),
            self.ts,
            self.sampler,
            noise=lambda i, eps: noises[i + 1],  # the stage noises, fixed or fresh
            after_step=after,
        )
        item = _Item(
            index, run=run, pending=next(run), ref=z0 if self.residual else None, control=control
        )
        self._assign_writer(item)
        return item

    def _check(self, frame: np.ndarray) -> np.ndarray:
        frame, self._size = checked_frame(frame, self._size)
        return frame

    def _predictor(self, image: Image.Image):
        """The ε prediction of every frame: the UNet on the whole frame, or window-averaged."""
        if self.windows is None:
            o = self.options
            return noise_predictor(
                self.model,
                self.cond,
                image.height,
                image.width,
                cfg_mode=o.cfg_mode,
                sampler=self.sampler,
                delta=o.cfg_delta,
            )
        return self.windows.predictor(self.model, self.cond, callback=self._count_window_batch)

    def _eps_of(self, rows: Sequence[_Item]):
        """ε for these frames' rows: the stream's predictor, with their ControlNet maps stacked
        in row order when the stream has controls."""
        if rows[0].control is None:
            return self._eps
        stacked = zip(*[r.control.images for r in rows], strict=True)  # per net: each row's map
        control = replace(rows[0].control, images=tuple(torch.cat(ims) for ims in stacked))
        h, w = (8 * side for side in rows[0].pending[0].shape[-2:])
        if self.windows is None:
            o = self.options
            return noise_predictor(
                self.model,
                self.cond,
                h,
                w,
                control=control,
                cfg_mode=o.cfg_mode,
                sampler=self.sampler,
                delta=o.cfg_delta,
            )
        return self.windows.predictor(
            self.model, self.cond, callback=self._count_window_batch, control=control
        )

    def _count_window_batch(self, done: int, total: int) -> None:
        self.stats.unet_calls += 1  # one UNet call per window batch

    def _latent(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """Encode one frame (tiled when the stream has windows), drawing from `generator`."""
        if self.windows is None:
            return encode(self.model, image, generator)
        return self.windows.encode(self.model, image, generator)

    def _encode(self, image: Image.Image) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Encode and return the stage noises, drawn in img2img's order (posterior, start, steps)."""
        if self._noises is not None:  # fixed noise: the first frame's posterior draw, again
            return self._latent(image, self._reseeded()), self._noises
        z0 = self._latent(image, self._generator)
        n = len(self.ts)
        noises = [self._randn(z0)]
        noises += [self._randn(z0) if self.sampler.needs_noise(i, n) else None for i in range(n)]
        if self.fixed:
            self._noises = noises
        return z0, noises

    def _reseeded(self) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(self.options.seed)

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return randn_tensor(
            like.shape, generator=self._generator, device=like.device, dtype=like.dtype
        )

    def _install_bank(self) -> None:
        """Anchor and bank modes: one bank, read and written by processors on the chosen layers."""
        o, unet = self.options, self.model.unet
        if o.consistency == "anchor":
            self._bank = FeatureBank(size=1, merge=None)  # one frame, replaced whole
            layers = select_layers(unet, o.anchor_layers)
        else:
            self._bank = FeatureBank(size=o.bank_size, merge=o.bank_merge)
            layers = select_layers(unet, o.anchor_layers or len(self_attention_layers(unet)))
        self._processors = {name: BankAttnProcessor(name, self._bank) for name in layers}

    def _assign_writer(self, item: _Item) -> None:
        """The first processed frame stores into the bank, then one every N frames (0: never)."""
        if self._bank is None:
            return
        o = self.options
        every = o.anchor_every if o.consistency == "anchor" else o.bank_every
        if self._writer is None or (every and item.index - self._writer >= every):
            self._writer = item.index
            self.stats.banked += 1
            item.writes = True

    # --- the stages ----------------------------------------------------------------------------

    def _sequential(self, items: Iterable[_Item]) -> Iterator[_Item]:
        for item in items:
            if not item.skip:
                self._run_through(item)
            yield item

    def _pipeline(self, items: Iterable[_Item]) -> Iterator[_Item]:
        """Stream batch: each processed arrival advances every frame in flight by one stage."""
        flight: deque[_Item] = deque()  # arrival order; emitted from the left
        for item in items:
            flight.append(item)
            if not item.skip:
                self._advance(flight)
            while flight and self._done(flight[0]):
                yield flight.popleft()
        while flight:
            if self._done(flight[0]):
                yield flight.popleft()
            else:
                self._advance(flight)

    def _done(self, item: _Item) -> bool:
        return item.skip or item.pending is None

    @torch.no_grad()
    def _run_through(self, item: _Item) -> None:
        """Run one frame through all its remaining stages, one UNet call each."""
        while item.pending is not None:
            z, t = item.pending
            eps = self._predict([item], z, t)
            if self.windows is None:  # tiled: counted per window batch (`_predictor`)
                self.stats.unet_calls += 1
            item.send(eps)

    @torch.no_grad()
    def _advance(self, flight: Iterable[_Item]) -> None:
        """One batched UNet call: every unfinished frame in flight moves one stage on."""
        rows = [it for it in flight if not self._done(it)]
        if not rows:
            return
        z = torch.cat([it.pending[0] for it in rows])  # (B, 4, h, w): one latent per frame
        t = torch.tensor([it.pending[1] for it in rows], device=z.device)  # (B,)
        eps = self._predict(rows, z, t)
        self.stats.unet_calls += 1
        for j, item in enumerate(rows):
            item.send(eps[j : j + 1])

    def _predict(self, items: Sequence[_Item], z: torch.Tensor, t) -> torch.Tensor:
        """One ε call for `items` (one latent each): tells the bank which rows read and write
        which slots, and hands residual CFG each frame's reference latent (and takes it back)."""
        real = tuple(it.stage == 0 for it in items) if self.options.cfg_mode == "initialize" else ()
        rows = cfg_rows(len(items), self.cond, self.options.cfg_mode, real)
        if self.windows is None:
            self.stats.unet_rows += len(rows)
        residual = None
        if self.residual:
            residual = Residual(torch.cat([it.ref for it in items]), real)
        with self._attention(items, rows):
            eps_fn = self._eps_of(items)
            eps = eps_fn(z, t) if residual is None else eps_fn(z, t, residual)
        if residual is not None:
            for j, item in enumerate(items):
                item.ref = residual.ref[j : j + 1]
        return eps

    @contextlib.contextmanager
    def _attention(self, items: Sequence[_Item], rows) -> Iterator[None]:
        """Anchor and bank modes: the bank processors, told each UNet row's slot, for one call."""
        if self._bank is None:
            yield
            return
        self._bank.set_rows(
            Row((items[j].stage, kind), items[j].index, items[j].writes) for j, kind in rows
        )
        with installed(self.model.unet, self._processors):
            yield
        self.stats.bank_peak = self._bank.peak

    # --- one frame out -------------------------------------------------------------------------

    @torch.no_grad()
    def _emit(self, item: _Item) -> np.ndarray:
        """Decode and crop a finished frame; a skipped one repeats the last output."""
        if not item.skip:
            h, w = self._size
            decoded = decode if self.windows is None else self.windows.decode
            arr = decoded(self.model, item.z)[0]
            self._last = to_uint8(arr)[:h, :w]
            item.z = item.ref = None
        return self._last
