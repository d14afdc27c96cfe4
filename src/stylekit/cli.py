"""The `stylekit` command: parse, call the library, print. torch is imported only inside commands.

Exit codes: 0 all done, 1 some inputs failed, 2 usage or setup error (nothing could start),
130 interrupted. Every error is one line; the global `--debug` adds its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console

from stylekit import __version__
from stylekit.clihelp import App
from stylekit.errors import StylekitError, UsageError, one_line
from stylekit.presets import SETTINGS_FIELD

app = App(  # typer.Typer with help laid out for 80 columns (stylekit.clihelp)
    name="stylekit",
    help="Batch image and video stylization and texture synthesis with few-step diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)

MODEL = "Model"
SAMPLING = "Sampling"
STYLE = "Style"
FILES = "Files"
RUN = "Run"

# --- shared options ----------------------------------------------------------------------------
Preset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Built-in preset name or a .toml file (see `stylekit presets`).",
        rich_help_panel=MODEL,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hub id, local diffusers folder, or single .safetensors checkpoint.",
        rich_help_panel=MODEL,
    ),
]
Lora = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        help="LoRA file, folder or hub file, with optional :SCALE; repeatable.",
        rich_help_panel=MODEL,
    ),
]
Accelerator = Annotated[
    str | None,
    typer.Option(
        "--accelerator",
        help="Few-step LoRA: auto (per command: STD for SDXL images and video, TCD/LCM-LoRA from noise and on SD1.5, none for turbo and SD 2.x), none, or a LoRA.",
        rich_help_panel=MODEL,
    ),
]
Turbo = Annotated[
    bool | None,
    typer.Option(
        "--turbo/--no-turbo",
        help="The model is a turbo (ADD) model: no accelerator LoRA, trailing timesteps. Default: only stabilityai/sd-turbo and sdxl-turbo are.",
        rich_help_panel=MODEL,
    ),
]
TinyVae = Annotated[
    bool | None,
    typer.Option(
        "--tiny-vae/--full-vae",
        help="Decode with TAESD/TAESDXL (much faster, slightly softer).",
        rich_help_panel=MODEL,
    ),
]
TinyVaeModel = Annotated[
    str | None,
    typer.Option(
        "--tiny-vae-model",
        help="Hub id or folder of the tiny VAE for --tiny-vae (default madebyollin/taesd or taesdxl).",
        rich_help_panel=MODEL,
    ),
]
Vae = Annotated[
    str | None,
    typer.Option(
        "--vae",
        help="Full VAE replacing the model's: hub id, folder or .safetensors (SDXL in fp16: madebyollin/sdxl-vae-fp16-fix).",
        rich_help_panel=MODEL,
    ),
]
IpAdapter = Annotated[
    str | None,
    typer.Option(
        "--ip-adapter",
        help="IP-Adapter: auto (the family's default), a local file/folder, or owner/repo/file.safetensors.",
        rich_help_panel=MODEL,
    ),
]
ImageEncoder = Annotated[
    str | None,
    typer.Option(
        "--image-encoder",
        help="CLIP image encoder for the IP-Adapter: a local folder or a folder of its hub repo (default: the one the adapter needs).",
        rich_help_panel=MODEL,
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or mps.", rich_help_panel=RUN)
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto (cuda/mps fp16, cpu bf16 where supported), fp32, fp16 or bf16.",
        rich_help_panel=RUN,
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow .ckpt/.bin/.pt checkpoints (they can run code).",
        rich_help_panel=MODEL,
    ),
]
ModelConfig = Annotated[
    str | None,
    typer.Option(
        "--model-config",
        help="Diffusers config (folder or hub id) for a single-file checkpoint.",
        rich_help_panel=MODEL,
    ),
]
Scheduler = Annotated[
    str | None, typer.Option("--scheduler", help="tcd or lcm.", rich_help_panel=SAMPLING)
]
Steps = Annotated[
    int | None,
    typer.Option(
        "--steps", help="UNet evaluations actually run (NFE), e.g. 4-8.", rich_help_panel=SAMPLING
    ),
]
Strength = Annotated[
    float | None,
    typer.Option(
        "--strength",
        help="How far the content image is noised, 0-1 (STD's η).",
        rich_help_panel=SAMPLING,
    ),
]
Cfg = Annotated[
    float | None,
    typer.Option(
        "--cfg",
        help="Classifier-free guidance scale; <= 1 skips the unconditional pass.",
        rich_help_panel=SAMPLING,
    ),
]
Gamma = Annotated[
    float | None,
    typer.Option(
        "--gamma",
        help="TCD stochasticity γ in [0, 1]; 0 is deterministic.",
        rich_help_panel=SAMPLING,
    ),
]
Prompt = Annotated[
    str | None, typer.Option("--prompt", "-p", help="Text prompt.", rich_help_panel=SAMPLING)
]
Negative = Annotated[
    str | None,
    typer.Option(
        "--negative", help="Negative prompt (used when CFG > 1).", rich_help_panel=SAMPLING
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Base seed; image i gets seed+i. Random (and recorded) if omitted.",
        rich_help_panel=SAMPLING,
    ),
]
Style = Annotated[
    list[Path] | None,
    typer.Option("--style", "-s", help="Style reference image; repeatable.", rich_help_panel=STYLE),
]
StyleMode = Annotated[
    str | None,
    typer.Option("--style-mode", help="ipadapter, ad, both or none.", rich_help_panel=STYLE),
]
StyleScale = Annotated[
    float | None,
    typer.Option(
        "--style-scale", help="IP-Adapter weight on the style block.", rich_help_panel=STYLE
    ),
]
AdIters = Annotated[
    int | None,
    typer.Option(
        "--ad-iters", help="AD refinement Adam iterations after each step.", rich_help_panel=STYLE
    ),
]
AdLr = Annotated[
    float | None,
    typer.Option("--ad-lr", help="AD refinement learning rate.", rich_help_panel=STYLE),
]
AdAdain = Annotated[
    bool | None,
    typer.Option(
        "--adain/--no-adain",
        help="Match latent channel statistics to the reference before AD refinement.",
        rich_help_panel=STYLE,
    ),
]
ContentWeight = Annotated[
    float | None,
    typer.Option(
        "--content-weight",
        help="AD content-loss weight (keeps the input's structure); default 0, or 0.25 with --mode optimize.",
        rich_help_panel=STYLE,
    ),
]
AdCheckpointing = Annotated[
    bool | None,
    typer.Option(
        "--ad-checkpointing/--no-ad-checkpointing",
        help="Gradient checkpointing during AD refinement: less memory, slower (default: only when AD would not fit in free memory).",
        rich_help_panel=STYLE,
    ),
]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output folder (default ./stylized), or a file name for a single input.",
        rich_help_panel=FILES,
    ),
]
Format = Annotated[
    str | None,
    typer.Option("--format", "-f", help="png, jpg or webp (default png).", rich_help_panel=FILES),
]
Suffix = Annotated[
    str, typer.Option("--suffix", help="Added to every output's stem.", rich_help_panel=FILES)
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace outputs that exist (default: skip them, so a rerun resumes).",
        rich_help_panel=FILES,
    ),
]
Size = Annotated[
    str | None,
    typer.Option(
        "--size", help="Run inputs at exactly WxH (multiples of 8).", rich_help_panel=FILES
    ),
]
MaxSize = Annotated[
    int | None,
    typer.Option(
        "--max-size",
        help="Run inputs with the longer side at most N (instead of the native pixel budget).",
        rich_help_panel=FILES,
    ),
]
MaxPixels = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        help="Run inputs at most N pixels (WxH), aspect kept; default the model's native budget (512² SD1.5, 1024² SDXL); 0: no cap.",
        rich_help_panel=FILES,
    ),
]
KeepSize = Annotated[
    bool,
    typer.Option(
        "--keep-size",
        help="Write outputs at the input's size, resampled back from the working size.",
        rich_help_panel=FILES,
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="List what would be done and exit.", rich_help_panel=RUN)
]
Json = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON record per output on stdout.", rich_help_panel=RUN),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress display.", rich_help_panel=RUN)
]
NoSizeCheck = Annotated[
    bool,
    typer.Option(
        "--no-size-check",
        help="Run sizes the memory estimate says will not fit (default: refuse them up front).",
        rich_help_panel=RUN,
    ),
]


DEBUG = {"on": False}  # the global --debug of the running invocation (main_options sets it)


def version_callback(value: bool) -> None:
    if value:
        print(f"stylekit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Print the traceback behind an error (before the command)."),
    ] = False,
) -> None:
    """Batch image and video stylization and texture synthesis with few-step diffusion models."""
    DEBUG["on"] = debug


# --- options of single commands ---------------------------------------------------------------
MASK, VIDEO, CANVAS = "Mask", "Video", "Canvas"
Inputs = Annotated[
    list[str],
    typer.Argument(
        metavar="INPUT", help="Image files, folders (recursive) or globs.", show_default=False
    ),
]
Mode = Annotated[
    str | None,
    typer.Option(
        "--mode",
        help="sample (few-step, default) or optimize (AD's optimisation transfer: slow, highest fidelity).",
        rich_help_panel=STYLE,
    ),
]
OptSteps = Annotated[
    int | None,
    typer.Option(
        "--opt-steps",
        help="Timesteps of --mode optimize (default 200; 300 for textures).",
        rich_help_panel=STYLE,
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Same-size images per UNet batch (default 4 on CPU, 2 on GPU); each image keeps its own seed and result.",
        rich_help_panel=RUN,
    ),
]
AdStyleMode = Annotated[
    str | None,
    typer.Option(
        "--style-mode",
        help="ad or none; with --style references, ipadapter and both too.",
        rich_help_panel=STYLE,
    ),
]
MaskPath = Annotated[
    Path,
    typer.Option(
        "--mask",
        help="Mask image for every input, or a folder of masks matched by file stem; white = repaint.",
        show_default=False,
        rich_help_panel=MASK,
    ),
]
InvertMask = Annotated[
    bool,
    typer.Option("--invert-mask", help="Repaint the black part instead.", rich_help_panel=MASK),
]
MaskBlur = Annotated[
    int,
    typer.Option(
        "--mask-blur",
        help="Feather the seam over N px outside the mask (0..64).",
        rich_help_panel=MASK,
    ),
]
MaskPadding = Annotated[
    int,
    typer.Option(
        "--mask-padding",
        help="Context in px around the mask's box, cropped and repainted with it at the working size.",
        rich_help_panel=MASK,
    ),
]
CropSize = Annotated[
    str | None,
    typer.Option(
        "--size",
        help="Run the mask's crop at exactly WxH (the crop widened to that aspect ratio).",
        rich_help_panel=FILES,
    ),
]
Videos = Annotated[
    list[str],
    typer.Argument(metavar="INPUT", help="Video files or folders (recursive).", show_default=False),
]
VideoFormat = Annotated[
    str | None,
    typer.Option(
        "--format", "-f", help="mp4, m4v, mov, mkv or webm (default mp4).", rich_help_panel=FILES
    ),
]
FramesOut = Annotated[
    Path | None,
    typer.Option(
        "--frames-out",
        help="Write PNG frames to DIR/<name>/ instead of videos.",
        rich_help_panel=FILES,
    ),
]
Codec = Annotated[
    str | None,
    typer.Option(
        "--codec",
        help="Video encoder (default libx264; libvpx-vp9 for .webm).",
        rich_help_panel=VIDEO,
    ),
]
Crf = Annotated[
    int | None,
    typer.Option(
        "--crf", help="Constant quality (lower is better; x264 default 18).", rich_help_panel=VIDEO
    ),
]
Start = Annotated[
    float | None, typer.Option("--start", help="First second to keep.", rich_help_panel=VIDEO)
]
End = Annotated[
    float | None, typer.Option("--end", help="Stop before this second.", rich_help_panel=VIDEO)
]
MaxFrames = Annotated[
    int | None,
    typer.Option("--max-frames", help="Stylise at most N frames per video.", rich_help_panel=VIDEO),
]
Every = Annotated[
    int,
    typer.Option(
        "--every",
        help="Keep every N-th frame (the output rate drops N times).",
        rich_help_panel=VIDEO,
    ),
]
Consistency = Annotated[
    str,
    typer.Option(
        "--consistency",
        help="none (fresh noise each frame), noise (fixed noise), anchor (also attend to an anchor frame), bank (also attend to a bank of past frames' features).",
        rich_help_panel=VIDEO,
    ),
]
AnchorEvery = Annotated[
    int,
    typer.Option(
        "--anchor-every",
        help="Refresh the anchor frame every N frames; 0 keeps the first.",
        rich_help_panel=VIDEO,
    ),
]
BankSize = Annotated[
    int,
    typer.Option(
        "--bank-size",
        help="--consistency bank: keep at most N frames' worth of attention features.",
        rich_help_panel=VIDEO,
    ),
]
BankEvery = Annotated[
    int,
    typer.Option(
        "--bank-every",
        help="--consistency bank: one frame (motion: window) in N stores its features; 0 only the first.",
        rich_help_panel=VIDEO,
    ),
]
CfgMode = Annotated[
    str,
    typer.Option(
        "--cfg-mode",
        help="full (an unconditional pass per frame), self (residual CFG, no extra pass), initialize (one real unconditional pass at the first stage), none.",
        rich_help_panel=VIDEO,
    ),
]
SkipSimilar = Annotated[
    float | None,
    typer.Option(
        "--skip-similar",
        help="Skip frames this similar to the last one stylised (e.g. 0.98); off if omitted.",
        rich_help_panel=VIDEO,
    ),
]
MaxSkip = Annotated[
    int,
    typer.Option("--max-skip", help="At most N skipped frames in a row.", rich_help_panel=VIDEO),
]
MotionAdapter = Annotated[
    str | None,
    typer.Option(
        "--motion-adapter",
        help="AnimateDiff MotionAdapter (hub id or folder, e.g. wangfuyun/AnimateLCM): frames are denoised jointly in context windows.",
        rich_help_panel=VIDEO,
    ),
]
ContextFrames = Annotated[
    int,
    typer.Option(
        "--context-frames", help="Frames per motion window.", rich_help_panel=VIDEO, min=1
    ),
]
ContextOverlap = Annotated[
    int,
    typer.Option(
        "--context-overlap",
        help="Frames each motion window shares with the next (outputs averaged there).",
        rich_help_panel=VIDEO,
        min=0,
    ),
]
StreamBatch = Annotated[
    bool | None,
    typer.Option(
        "--stream-batch/--no-stream-batch",
        help="Batch all denoising stages of several frames in one UNet call (default on; outputs are then a few frames late, which files never notice).",
        rich_help_panel=VIDEO,
    ),
]
FrameMaxSize = Annotated[
    int | None,
    typer.Option(
        "--max-size",
        help="Run frames with the longer side at most N (instead of the native pixel budget).",
        rich_help_panel=FILES,
    ),
]
FrameKeepSize = Annotated[
    bool,
    typer.Option(
        "--keep-size/--no-keep-size",
        help="Write frames at the input's size (default), or at the working size they ran at.",
        rich_help_panel=FILES,
    ),
]
Exemplars = Annotated[
    list[str],
    typer.Argument(
        metavar="EXEMPLAR",
        help="Exemplar images, folders (recursive) or globs; one texture each.",
        show_default=False,
    ),
]
Window = Annotated[
    int | None,
    typer.Option(
        "--window",
        help="MultiDiffusion window in latents (8 px); default the model's native size (64 SD1.5).",
        rich_help_panel=CANVAS,
    ),
]
Stride = Annotated[
    int | None,
    typer.Option(
        "--stride",
        help="Step between windows in latents; default half the window.",
        rich_help_panel=CANVAS,
    ),
]
ViewBatch = Annotated[
    int, typer.Option("--view-batch", help="Windows per UNet call.", rich_help_panel=CANVAS)
]
Seamless = Annotated[
    str | None,
    typer.Option(
        "--seamless", help="Make the texture tile along x, y or xy.", rich_help_panel=CANVAS
    ),
]
TiledFlag = Annotated[
    bool,
    typer.Option(
        "--tiled",
        help="Run at the input's full size over MultiDiffusion windows (tiled VAE) instead of "
        "shrinking it to the working size.",
        rich_help_panel=CANVAS,
    ),
]
Upscale = Annotated[
    float | None,
    typer.Option(
        "--upscale",
        help="With --tiled: resample the input by this factor (Lanczos) first, then re-detail it.",
        rich_help_panel=CANVAS,
    ),
]
ExemplarMaxSize = Annotated[
    int | None,
    typer.Option(
        "--max-size",
        help="Shrink exemplars so the longer side is at most N (default: the model's native size).",
        rich_help_panel=FILES,
    ),
]
SourceMask = Annotated[
    Path | None,
    typer.Option(
        "--source-mask",
        help="Label map over the exemplar (equal colours = one label); needs --target-mask.",
        show_default=False,
        rich_help_panel=CANVAS,
    ),
]
TargetMask = Annotated[
    Path | None,
    typer.Option(
        "--target-mask",
        help="Label map over the texture: each colour takes the exemplar's region of that colour.",
        show_default=False,
        rich_help_panel=CANVAS,
    ),
]

GenerateSize = Annotated[
    str | None,
    typer.Option(
        "--size", help="WxH to generate (default: the model's native size).", rich_help_panel=FILES
    ),
]
PromptText = Annotated[
    str, typer.Argument(metavar="PROMPT", help="What to generate.", show_default=False)
]
Count = Annotated[
    int, typer.Option("--count", "-n", help="How many images.", rich_help_panel=FILES)
]
TextureSize = Annotated[
    str,
    typer.Option("--size", help="Texture size WxH in px (multiples of 8).", rich_help_panel=CANVAS),
]
CanvasSize = Annotated[
    str | None,
    typer.Option(
        "--size",
        help="Texture size WxH in px (default: the target mask's, else the exemplar's).",
        rich_help_panel=CANVAS,
    ),
]
# Help that differs where a command lacks what the shared text mentions (--mode, --style, inputs)
SampleContentWeight = Annotated[
    float | None,
    typer.Option(
        "--content-weight",
        help="AD content-loss weight (keeps the input's structure); default 0.",
        rich_help_panel=STYLE,
    ),
]
TextureStyleMode = Annotated[
    str | None,
    typer.Option(
        "--style-mode", help="ad (AD guidance by the exemplar) or none.", rich_help_panel=STYLE
    ),
]
GenerateOut = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output folder (default ./stylized), or a file name when --count is 1.",
        rich_help_panel=FILES,
    ),
]
VideoSeed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Base seed; video i gets seed+i, which fixes its noise. Random (and recorded) if omitted.",
        rich_help_panel=SAMPLING,
    ),
]
TextureMode = Annotated[
    str | None,
    typer.Option(
        "--mode",
        help="sample (few-step, AD-guided) or optimize (AD's optimisation from noise: slow).",
        rich_help_panel=STYLE,
    ),
]


# --- structure control (ControlNet, docs/controlnet.md) ------------------------------------------
CONTROL = "Structure control"
Control = Annotated[
    list[str] | None,
    typer.Option(
        "--control",
        help="ControlNet control TYPE[:SCALE]: canny, depth or tile; repeatable.",
        rich_help_panel=CONTROL,
    ),
]
ControlNet = Annotated[
    list[str] | None,
    typer.Option(
        "--controlnet",
        help="ControlNet hub id, folder or .safetensors replacing the family's default; one per --control, in order.",
        rich_help_panel=CONTROL,
    ),
]
ControlScale = Annotated[
    float | None,
    typer.Option(
        "--control-scale",
        help="Scale of controls given without :SCALE (default 0.8).",
        rich_help_panel=CONTROL,
    ),
]
ControlStart = Annotated[
    float | None,
    typer.Option(
        "--control-start",
        help="Fraction of the steps before the ControlNet residuals apply (default 0).",
        rich_help_panel=CONTROL,
    ),
]
ControlEnd = Annotated[
    float | None,
    typer.Option(
        "--control-end",
        help="Fraction of the steps after which the residuals stop (default 1).",
        rich_help_panel=CONTROL,
    ),
]
ControlImage = Annotated[
    str | None,
    typer.Option(
        "--control-image",
        help="Precomputed control map: a file, or a folder matched to the inputs by file stem.",
        rich_help_panel=CONTROL,
    ),
]
ControlType = Annotated[
    str | None,
    typer.Option(
        "--control-type",
        help="The control --control-image is for (default: the only --control).",
        rich_help_panel=CONTROL,
    ),
]
Canny = Annotated[
    str | None,
    typer.Option(
        "--canny", help="Canny thresholds LOW,HIGH (default 100,200).", rich_help_panel=CONTROL
    ),
]
DepthModel = Annotated[
    str | None,
    typer.Option(
        "--depth-model",
        help="Depth-estimation model for --control depth (default depth-anything/Depth-Anything-V2-Small-hf).",
        rich_help_panel=CONTROL,
    ),
]


# --- many machines: --engine ray and --shard (stylekit.distributed, stylekit.shards) --------------
SCALE = "Many machines"
EngineName = Annotated[
    str,
    typer.Option(
        "--engine",
        help="local (this process) or ray (a pool of Ray workers, each loading the model once; needs stylekit's ray extra).",
        rich_help_panel=SCALE,
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Ray cluster to run on (auto, or HOST:6379 of its head); default: a local Ray instance for this run.",
        rich_help_panel=SCALE,
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Ray workers (default: one per GPU, or 1 without GPUs).",
        rich_help_panel=SCALE,
    ),
]
GpusPerWorker = Annotated[
    float | None,
    typer.Option(
        "--gpus-per-worker",
        help="GPUs per Ray worker (default 1 when the cluster has GPUs, else 0; 0.5 puts two on a GPU).",
        rich_help_panel=SCALE,
    ),
]
ShardFlag = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Run only part K of N (K/N, 1-based): a stable split by input path, for Slurm arrays and other schedulers.",
        rich_help_panel=SCALE,
    ),
]


@dataclass(frozen=True)
class Scale:
    """--engine, its Ray options and --shard, as a command got them."""

    engine: str
    ray_address: str | None
    workers: int | None
    gpus_per_worker: float | None
    shard: str | None

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Scale:
        return cls(*(params[f.name] for f in fields(cls)))

    def output(self, output):
        """The command's Output with its --shard."""
        from dataclasses import replace

        from stylekit.shards import parse_shard

        return replace(output, shard=parse_shard(self.shard) if self.shard else None)

    def run(self, task, *args, **kwargs):
        """Call `task` with its batch on the chosen engine (`stylekit.distributed.run`)."""
        from stylekit.distributed import Ray, run

        if self.engine not in ("local", "ray"):
            raise UsageError(f"--engine {self.engine!r}; choose local or ray")
        ray_flags = (self.ray_address, self.workers, self.gpus_per_worker)
        if self.engine == "local" and any(flag is not None for flag in ray_flags):
            raise UsageError("--ray-address, --workers and --gpus-per-worker need --engine ray")
        engine = None
        if self.engine == "ray":
            engine = Ray(self.ray_address, self.workers, self.gpus_per_worker)
        return run(task, *args, engine=engine, **kwargs)


# --- commands ----------------------------------------------------------------------------------
# Each command lists all of its options, gathers the shared ones into CommonOptions and calls its
# `stylekit.api` function. Settings flags go by their Settings field names (--lora is `loras`,
# --adain is `ad_adain`); an unset flag is None and leaves the preset's value alone.
@app.command()
def stylize(
    inputs: Inputs,
    mode: Mode = None,
    opt_steps: OptSteps = None,
    batch_size: BatchSize = None,
    style: Style = None,
    out: Out = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    ip_adapter: IpAdapter = None,
    image_encoder: ImageEncoder = None,
    scheduler: Scheduler = None,
    steps: Steps = None,
    strength: Strength = None,
    cfg: Cfg = None,
    gamma: Gamma = None,
    prompt: Prompt = None,
    negative: Negative = None,
    style_mode: StyleMode = None,
    style_scale: StyleScale = None,
    ad_iters: AdIters = None,
    ad_lr: AdLr = None,
    adain: AdAdain = None,
    content_weight: ContentWeight = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: Seed = None,
    size: Size = None,
    max_size: MaxSize = None,
    max_pixels: MaxPixels = None,
    keep_size: KeepSize = False,
    tiled: TiledFlag = False,
    upscale: Upscale = None,
    window: Window = None,
    stride: Stride = None,
    view_batch: ViewBatch = 4,
    fmt: Format = None,
    suffix: Suffix = "",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: Json = False,
    quiet: Quiet = False,
    no_size_check: NoSizeCheck = False,
    engine: EngineName = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    shard: ShardFlag = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
    control: Control = None,
    controlnet: ControlNet = None,
    control_scale: ControlScale = None,
    control_start: ControlStart = None,
    control_end: ControlEnd = None,
    control_image: ControlImage = None,
    control_type: ControlType = None,
    canny: Canny = None,
    depth_model: DepthModel = None,
) -> None:
    """Stylise images with a few-step model, optionally after a style reference.

    Example: stylekit stylize photos/ --style ref.jpg --steps 4 -o styled/
    Full resolution: stylekit stylize big.jpg --tiled [--upscale 2]
    """
    common, scale = CommonOptions.of(locals()), Scale.of(locals())
    with cli_errors():
        wh, longest = parse_size_flag(size), check_max_size(max_size)
        from stylekit import api
        from stylekit.tasks.stylize import Tiled

        if not tiled and (upscale is not None or window is not None or stride is not None):
            raise UsageError("--upscale, --window and --stride need --tiled")
        tiling = None
        if tiled:
            tiling = Tiled(1.0 if upscale is None else upscale, window, stride, view_batch)

        with common.events() as events:
            report = scale.run(
                api.stylize,
                inputs,
                style=style_paths(style),
                preset=common.preset,
                output=scale.output(common.output()),
                runtime=common.runtime(),
                size=wh,
                max_size=longest,
                max_pixels=max_pixels,
                keep_size=keep_size,
                batch_size=batch_size,
                tiled=tiling,
                events=events,
                **common.settings,
            )
        exit_with(events, report)


@app.command("t2i-styled")
def t2i_styled(
    prompt_text: PromptText,
    count: Count = 1,
    style: Style = None,
    out: GenerateOut = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    ip_adapter: IpAdapter = None,
    image_encoder: ImageEncoder = None,
    scheduler: Scheduler = None,
    steps: Steps = None,
    cfg: Cfg = None,
    gamma: Gamma = None,
    negative: Negative = None,
    style_mode: AdStyleMode = None,
    style_scale: StyleScale = None,
    ad_iters: AdIters = None,
    ad_lr: AdLr = None,
    adain: AdAdain = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: Seed = None,
    size: GenerateSize = None,
    fmt: Format = None,
    suffix: Suffix = "",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: Json = False,
    quiet: Quiet = False,
    no_size_check: NoSizeCheck = False,
    engine: EngineName = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    shard: ShardFlag = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
    control: Control = None,
    controlnet: ControlNet = None,
    control_scale: ControlScale = None,
    control_start: ControlStart = None,
    control_end: ControlEnd = None,
    control_image: ControlImage = None,
    control_type: ControlType = None,
    canny: Canny = None,
    depth_model: DepthModel = None,
) -> None:
    """Generate images from a prompt in the style of reference images (AD-guided, few steps).

    Example: stylekit t2i-styled "a lighthouse at dusk" --style ref.jpg -n 4 --steps 4
    """
    common, scale = CommonOptions.of(locals()), Scale.of(locals())
    with cli_errors():
        wh = parse_size_flag(size)
        from stylekit import api

        with common.events() as events:
            report = scale.run(
                api.t2i_styled,
                prompt_text,
                style=style_paths(style),
                count=count,
                preset=common.preset,
                output=scale.output(common.output()),
                runtime=common.runtime(),
                size=wh,
                events=events,
                **common.settings,
            )
        exit_with(events, report)


@app.command()
def inpaint(
    inputs: Inputs,
    mask: MaskPath,
    invert_mask: InvertMask = False,
    mask_blur: MaskBlur = 4,
    mask_padding: MaskPadding = 32,
    style: Style = None,
    out: Out = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    ip_adapter: IpAdapter = None,
    image_encoder: ImageEncoder = None,
    scheduler: Scheduler = None,
    steps: Steps = None,
    strength: Strength = None,
    cfg: Cfg = None,
    gamma: Gamma = None,
    prompt: Prompt = None,
    negative: Negative = None,
    style_mode: StyleMode = None,
    style_scale: StyleScale = None,
    ad_iters: AdIters = None,
    ad_lr: AdLr = None,
    adain: AdAdain = None,
    content_weight: SampleContentWeight = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: Seed = None,
    size: CropSize = None,
    max_size: MaxSize = None,
    max_pixels: MaxPixels = None,
    tiled: TiledFlag = False,
    window: Window = None,
    stride: Stride = None,
    view_batch: ViewBatch = 4,
    fmt: Format = None,
    suffix: Suffix = "",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: Json = False,
    quiet: Quiet = False,
    no_size_check: NoSizeCheck = False,
    engine: EngineName = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    shard: ShardFlag = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
    control: Control = None,
    controlnet: ControlNet = None,
    control_scale: ControlScale = None,
    control_start: ControlStart = None,
    control_end: ControlEnd = None,
    control_image: ControlImage = None,
    control_type: ControlType = None,
    canny: Canny = None,
    depth_model: DepthModel = None,
) -> None:
    """Repaint the white part of a mask with a few-step model; every other pixel stays as it was.

    Example: stylekit inpaint photo.jpg --mask mask.png -p "a red door" --steps 4 -o out/
    Full resolution: stylekit inpaint big.jpg --mask mask.png --tiled
    """
    common, scale = CommonOptions.of(locals()), Scale.of(locals())
    with cli_errors():
        wh, longest = parse_size_flag(size), check_max_size(max_size)
        from stylekit import api
        from stylekit.tasks.stylize import Tiled

        if not tiled and (window is not None or stride is not None):
            raise UsageError("--window and --stride need --tiled")
        tiling = Tiled(1.0, window, stride, view_batch) if tiled else None

        with common.events() as events:
            report = scale.run(
                api.inpaint,
                inputs,
                mask=str(mask),
                invert_mask=invert_mask,
                mask_blur=mask_blur,
                mask_padding=mask_padding,
                style=style_paths(style),
                preset=common.preset,
                output=scale.output(common.output()),
                runtime=common.runtime(),
                size=wh,
                max_size=longest,
                max_pixels=max_pixels,
                tiled=tiling,
                events=events,
                **common.settings,
            )
        exit_with(events, report)


@app.command()
def video(
    inputs: Videos,
    frames_out: FramesOut = None,
    consistency: Consistency = "noise",
    anchor_every: AnchorEvery = 30,
    bank_size: BankSize = 1,
    bank_every: BankEvery = 4,
    cfg_mode: CfgMode = "full",
    skip_similar: SkipSimilar = None,
    max_skip: MaxSkip = 10,
    stream_batch: StreamBatch = None,
    motion_adapter: MotionAdapter = None,
    context_frames: ContextFrames = 16,
    context_overlap: ContextOverlap = 4,
    start: Start = None,
    end: End = None,
    max_frames: MaxFrames = None,
    every: Every = 1,
    codec: Codec = None,
    crf: Crf = None,
    style: Style = None,
    out: Out = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    ip_adapter: IpAdapter = None,
    image_encoder: ImageEncoder = None,
    scheduler: Scheduler = None,
    steps: Steps = None,
    strength: Strength = None,
    cfg: Cfg = None,
    gamma: Gamma = None,
    prompt: Prompt = None,
    negative: Negative = None,
    style_mode: StyleMode = None,
    style_scale: StyleScale = None,
    ad_iters: AdIters = None,
    ad_lr: AdLr = None,
    adain: AdAdain = None,
    content_weight: SampleContentWeight = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: VideoSeed = None,
    size: Size = None,
    max_size: FrameMaxSize = None,
    max_pixels: MaxPixels = None,
    keep_size: FrameKeepSize = True,
    tiled: TiledFlag = False,
    window: Window = None,
    stride: Stride = None,
    view_batch: ViewBatch = 4,
    fmt: VideoFormat = None,
    suffix: Suffix = "",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: Json = False,
    quiet: Quiet = False,
    no_size_check: NoSizeCheck = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
    control: Control = None,
    controlnet: ControlNet = None,
    control_scale: ControlScale = None,
    control_start: ControlStart = None,
    control_end: ControlEnd = None,
    control_image: ControlImage = None,
    control_type: ControlType = None,
    canny: Canny = None,
    depth_model: DepthModel = None,
) -> None:
    """Stylise videos frame by frame; audio and the exact frame rate are kept.

    Example: stylekit video clip.mp4 --style ref.jpg --consistency bank --cfg-mode self -o styled/
    Full resolution: stylekit video clip.mp4 --tiled (frames one at a time, no stream batch)
    """
    common = CommonOptions.of(locals())
    with cli_errors():
        wh, longest = parse_size_flag(size), check_max_size(max_size)
        from stylekit import api
        from stylekit.tasks.stylize import Tiled
        from stylekit.tasks.video import VideoConsoleEvents

        if not tiled and (window is not None or stride is not None):
            raise UsageError("--window and --stride need --tiled")
        tiling = Tiled(1.0, window, stride, view_batch) if tiled else None

        with common.events(VideoConsoleEvents) as events:
            report = api.stylize_video(
                inputs,
                frames_out=frames_out,
                consistency=consistency,
                anchor_every=anchor_every,
                bank_size=bank_size,
                bank_every=bank_every,
                cfg_mode=cfg_mode,
                skip_similar=skip_similar,
                max_skip=max_skip,
                stream_batch=stream_batch,
                start=start,
                end=end,
                max_frames=max_frames,
                every=every,
                codec=codec,
                crf=crf,
                style=style_paths(style),
                preset=common.preset,
                output=common.output(),
                runtime=common.runtime(),
                size=wh,
                max_size=longest,
                max_pixels=max_pixels,
                keep_size=keep_size,
                tiled=tiling,
                context_frames=context_frames,
                context_overlap=context_overlap,
                events=events,
                **common.settings,
            )
        exit_with(events, report)


@app.command("texture-expand")
def texture_expand(
    inputs: Exemplars,
    size: TextureSize,
    window: Window = None,
    stride: Stride = None,
    view_batch: ViewBatch = 4,
    seamless: Seamless = None,
    out: Out = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    scheduler: Scheduler = None,
    steps: Steps = None,
    cfg: Cfg = None,
    gamma: Gamma = None,
    prompt: Prompt = None,
    negative: Negative = None,
    style_mode: TextureStyleMode = None,
    ad_iters: AdIters = None,
    ad_lr: AdLr = None,
    adain: AdAdain = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: Seed = None,
    max_size: ExemplarMaxSize = None,
    fmt: Format = None,
    suffix: Suffix = "",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: Json = False,
    quiet: Quiet = False,
    no_size_check: NoSizeCheck = False,
    engine: EngineName = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    shard: ShardFlag = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
    control: Control = None,
    controlnet: ControlNet = None,
    control_scale: ControlScale = None,
    control_start: ControlStart = None,
    control_end: ControlEnd = None,
    control_image: ControlImage = None,
    control_type: ControlType = None,
    canny: Canny = None,
    depth_model: DepthModel = None,
) -> None:
    """Expand exemplars into textures of any size (MultiDiffusion + AD guidance, few steps).

    Example: stylekit texture-expand brick.png --size 1536x512 --seamless x -o textures/
    """
    common, scale = CommonOptions.of(locals()), Scale.of(locals())
    with cli_errors():
        wh, longest = parse_size_flag(size), check_max_size(max_size)
        from stylekit import api

        with common.events() as events:
            report = scale.run(
                api.texture_expand,
                inputs,
                size=wh,
                window=window,
                stride=stride,
                view_batch=view_batch,
                seamless=seamless,
                preset=common.preset,
                output=scale.output(common.output()),
                runtime=common.runtime(),
                max_size=longest,
                events=events,
                **common.settings,
            )
        exit_with(events, report)


@app.command()
def texture(
    inputs: Exemplars,
    size: CanvasSize = None,
    mode: TextureMode = None,
    opt_steps: OptSteps = None,
    source_mask: SourceMask = None,
    target_mask: TargetMask = None,
    window: Window = None,
    stride: Stride = None,
    view_batch: ViewBatch = 4,
    seamless: Seamless = None,
    out: Out = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    scheduler: Scheduler = None,
    steps: Steps = None,
    cfg: Cfg = None,
    gamma: Gamma = None,
    prompt: Prompt = None,
    negative: Negative = None,
    style_mode: TextureStyleMode = None,
    ad_iters: AdIters = None,
    ad_lr: AdLr = None,
    adain: AdAdain = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: Seed = None,
    max_size: ExemplarMaxSize = None,
    fmt: Format = None,
    suffix: Suffix = "",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: Json = False,
    quiet: Quiet = False,
    no_size_check: NoSizeCheck = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
) -> None:
    """Synthesise textures like exemplars (AD-guided sampling, or --mode optimize), with label masks.

    Example: stylekit texture moss.png --source-mask moss-labels.png --target-mask layout.png
    """
    common = CommonOptions.of(locals())
    with cli_errors():
        wh, longest = parse_size_flag(size), check_max_size(max_size)
        from stylekit import api

        with common.events() as events:
            report = api.texture(
                inputs,
                size=wh,
                source_mask=None if source_mask is None else str(source_mask),
                target_mask=None if target_mask is None else str(target_mask),
                window=window,
                stride=stride,
                view_batch=view_batch,
                seamless=seamless,
                preset=common.preset,
                output=common.output(),
                runtime=common.runtime(),
                max_size=longest,
                events=events,
                **common.settings,
            )
        exit_with(events, report)


@app.command()
def presets(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON record per preset on stdout.")
    ] = False,
) -> None:
    """List the built-in presets: model, steps, strength and what each is for; * marks the default.

    Example: stylekit stylize photo.jpg --style ref.jpg --preset lcm-sd15
    """
    import json
    import textwrap

    from stylekit.presets import builtin_names, preset_summary

    with cli_errors():
        rows = [preset_summary(name) for name in builtin_names()]
        if as_json:
            for row in rows:
                print(json.dumps(row))
            return
        n = max(10, *(len(row["name"]) for row in rows))  # the name column fits every name
        print(f"  {'NAME':<{n}} {'MODEL':<44} {'STEPS':>5} {'STRENGTH':>8}")
        for row in rows:
            mark = "*" if row["default"] else " "
            print(
                f"{mark} {row['name']:<{n}} {row['model']:<44} {row['steps']:>5} "
                f"{row['strength']:>8}"
            )
            text = row["purpose"] or row["description"]
            for line in textwrap.wrap(text, 76 - n, break_on_hyphens=False):
                print(f"{'':{n + 3}}{line}")
        print("* the default, used without --preset")


# --- models, doctor ------------------------------------------------------------------------------
models_app = typer.Typer(
    help="Fetch what a preset needs ahead of time (for offline machines) and see what is cached.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE / HF_HOME)."
    ),
]
PullCommand = Annotated[
    list[str] | None,
    typer.Option(
        "--command",
        help="Pull for these commands only (repeatable; default all): stylize, inpaint, video, t2i-styled, texture, texture-expand.",
    ),
]
PullStrength = Annotated[
    list[float] | None,
    typer.Option(
        "--strength",
        help="Pull the STD LoRA for these strengths only (repeatable; default: every released η).",
    ),
]
Variant = Annotated[
    str | None,
    typer.Option(
        "--variant", help="Hub weight variant to prefer, e.g. fp16.", rich_help_panel=MODEL
    ),
]


@models_app.command("pull")
def models_pull(
    preset_name: Annotated[
        str | None,
        typer.Argument(metavar="PRESET", help="Built-in preset or .toml file (default std-sdxl)."),
    ] = None,
    model: Model = None,
    variant: Variant = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    ip_adapter: IpAdapter = None,
    image_encoder: ImageEncoder = None,
    scheduler: Scheduler = None,
    style_mode: StyleMode = None,
    control: Control = None,
    controlnet: ControlNet = None,
    control_image: ControlImage = None,
    control_type: ControlType = None,
    depth_model: DepthModel = None,
    strength: PullStrength = None,
    command: PullCommand = None,
    cache_dir: CacheDir = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List files and sizes only.")] = False,
) -> None:
    """Download every file a preset (or flags) will load, so HF_HUB_OFFLINE=1 runs can find them.

    Offline (HF_HUB_OFFLINE=1) it checks the cache instead: exit 0 when complete, 2 if not.
    Example: stylekit models pull lcm-sd15 --command stylize --control canny
    """
    flags = {k: v for k, v in locals().items() if k not in ("preset_name", "strength", "command")}
    with cli_errors():
        from stylekit import hubfiles

        settings = hubfiles.settings_for(
            preset_name,
            **given_settings(
                **{
                    SETTINGS_FIELD.get(k, k): v
                    for k, v in flags.items()
                    if k not in ("cache_dir", "dry_run")
                }
            ),
        )
        hubfiles.pull(
            settings,
            commands=tuple(command or hubfiles.COMMANDS),
            strengths=strength,
            cache=cache_dir,
            dry_run=dry_run,
        )


@models_app.command("list")
def models_list(
    cache_dir: CacheDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per preset.")] = False,
) -> None:
    """Show, per built-in preset, whether the cache holds every file it needs, and the disk used."""
    with cli_errors():
        import json

        from stylekit import hubfiles
        from stylekit.engine import hub
        from stylekit.presets import builtin_names

        for name in builtin_names():
            st = hubfiles.preset_status(name, cache_dir)
            if as_json:
                print(
                    json.dumps(
                        {
                            "preset": name,
                            "model": st.model,
                            "complete": st.complete,
                            "missing": list(st.missing),
                            "bytes": st.bytes,
                        }
                    )
                )
                continue
            state = "complete" if st.complete else f"missing {len(st.missing)} file(s)"
            state = state if st.model_cached else "model not cached"
            print(f"{name:<12} {state:<20} {hubfiles.human(st.bytes):>9}  {st.model}")
            for path in st.missing[:5]:
                print(f"{'':<12}   missing {path}")
            if len(st.missing) > 5:
                print(f"{'':<12}   … and {len(st.missing) - 5} more")
        if not as_json:
            offline = "on" if hub.offline() else "off"
            print(f"cache: {hub.cache_dir(cache_dir)} (offline mode {offline})")


@app.command()
def doctor(
    preset: Preset = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder to check (default ./stylized)."),
    ] = None,
    cache_dir: CacheDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="The report as one JSON object.")] = False,
) -> None:
    """Check this machine: versions, devices and dtype, memory, ffmpeg, the model cache, the output folder.

    Exit 0 when the preset (default std-sdxl) can run, 1 otherwise, saying what is missing.
    """
    with cli_errors():
        import json

        from stylekit import doctor as doc

        report = doc.diagnose(preset=preset, out=out, cache_dir=cache_dir)
        if as_json:
            print(json.dumps(report.as_dict(), default=str))
        else:
            for line in doc.lines(report):
                print(line)
        raise typer.Exit(0 if report.ok else 1)


# --- sweep ---------------------------------------------------------------------------------------
SweepSource = Annotated[
    str,
    typer.Argument(
        metavar="INPUT",
        help="The image (the exemplar for texture-expand; the prompt for t2i-styled).",
        show_default=False,
    ),
]
Vary = Annotated[
    list[str] | None,
    typer.Option(
        "--vary",
        help="KEY=V1,V2,... (any setting, or seed; V1|V2 when values hold commas); 1st: columns, 2nd: rows, 3rd: one sheet per value.",
        show_default=False,
    ),
]
SweepCommand = Annotated[
    str, typer.Option("--command", help="stylize, t2i-styled or texture-expand.")
]
SheetOut = Annotated[
    Path,
    typer.Option("--out", "-o", help="The contact sheet; its cells go to a folder beside it."),
]
SweepSize = Annotated[
    str | None,
    typer.Option(
        "--size",
        help="WxH: stylize's working size, t2i-styled's image, texture-expand's texture (required there).",
        rich_help_panel=FILES,
    ),
]
SweepMaxSize = Annotated[
    int | None,
    typer.Option(
        "--max-size",
        help="Longer side at most N (stylize: the input; texture-expand: the exemplar).",
        rich_help_panel=FILES,
    ),
]


@app.command()
def sweep(
    source: SweepSource,
    vary: Vary = None,
    command: SweepCommand = "stylize",
    out: SheetOut = Path("sweep.png"),
    mode: Mode = None,
    opt_steps: OptSteps = None,
    style: Style = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    turbo: Turbo = None,
    tiny_vae: TinyVae = None,
    tiny_vae_model: TinyVaeModel = None,
    vae: Vae = None,
    ip_adapter: IpAdapter = None,
    image_encoder: ImageEncoder = None,
    scheduler: Scheduler = None,
    steps: Steps = None,
    strength: Strength = None,
    cfg: Cfg = None,
    gamma: Gamma = None,
    prompt: Prompt = None,
    negative: Negative = None,
    style_mode: StyleMode = None,
    style_scale: StyleScale = None,
    ad_iters: AdIters = None,
    ad_lr: AdLr = None,
    adain: AdAdain = None,
    content_weight: ContentWeight = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: Seed = None,
    size: SweepSize = None,
    max_size: SweepMaxSize = None,
    max_pixels: MaxPixels = None,
    seamless: Seamless = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
    quiet: Quiet = False,
    no_size_check: NoSizeCheck = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
) -> None:
    """Run one input over a grid of settings with one model load; write a labelled contact sheet.

    Example: stylekit sweep photo.jpg --vary strength=0.4,0.6,0.8 --vary style_scale=0.5,1.0 --style ref.jpg -o sheet.png
    Cells (with their metadata) and cells.json go to sheet/; a rerun skips the cells already there.
    """
    params = locals()
    with cli_errors():
        from stylekit import sweep as sw
        from stylekit.presets import Settings
        from stylekit.progress import ConsoleEvents
        from stylekit.session import Runtime

        known = {f.name for f in fields(Settings)}
        flags = {SETTINGS_FIELD.get(k, k): v for k, v in params.items()}
        overrides = given_settings(**{k: v for k, v in flags.items() if k in known})
        runtime = Runtime(device, dtype, allow_pickle, model_config, size_check=not no_size_check)
        options = sw.Options(parse_size_flag(size), check_max_size(max_size), max_pixels, seamless)
        events = ConsoleEvents(err, as_json=as_json, quiet=quiet, unit="cells", debug=debug_mode())
        with events:
            report = sw.sweep(
                source,
                axes=[sw.parse_axis(text) for text in vary or ()],
                command=command,
                sheet=out,
                style=style_paths(style),
                preset=preset,
                seed=seed,
                overwrite=overwrite,
                runtime=runtime,
                options=options,
                events=events,
                **overrides,
            )
        colour = "red" if report.exit_code() else "green"
        err.print(f"[{colour}]{escape(report.summary())}[/{colour}]")
        for path in report.sheets:
            err.print(f"sheet: {escape(str(path))}  (cells in {escape(str(sw.cells_folder(out)))})")
        raise typer.Exit(report.exit_code())


# --- distill: train a few-step LoRA (STD or ADD) on accelerate ---------------------------------
TRAIN, DATA = "Training", "Data"


def _opt(*names: str, help: str, panel: str = TRAIN, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


@app.command()
def distill(
    teacher: Annotated[
        str,
        _opt(
            "--teacher",
            help="Teacher model: hub id, diffusers folder or .safetensors (SD 1.x or SDXL, ε-prediction).",
            panel=MODEL,
            show_default=False,
        ),
    ],
    data: Annotated[
        list[str],
        _opt(
            "--data",
            help="Training images: files, folders (recursive), globs or videos (frames sampled); repeatable.",
            panel=DATA,
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        _opt(
            "--out",
            "-o",
            help="The LoRA file to write (.safetensors).",
            panel=FILES,
            show_default=False,
        ),
    ],
    method: Annotated[
        str,
        _opt(
            "--method",
            help="std (Single Trajectory Distillation, img2img at one strength) or add (Adversarial Diffusion Distillation).",
        ),
    ] = "std",
    prompt: Annotated[
        str,
        _opt("--prompt", "-p", help="Caption for images without a .txt beside them.", panel=DATA),
    ] = "",
    frames_per_video: Annotated[
        int, _opt("--frames-per-video", help="Frames sampled evenly from each video.", panel=DATA)
    ] = 8,
    resolution: Annotated[
        int, _opt("--resolution", help="Training crop size in px.", panel=DATA)
    ] = 512,
    eta: Annotated[
        float,
        _opt(
            "--eta",
            help="STD: the strength η whose trajectory is distilled (run the LoRA at that stylize strength).",
        ),
    ] = 0.75,
    gamma: Annotated[
        float,
        _opt(
            "--gamma",
            help="STD: target steps lie within (1 − γ)·η of the trajectory below the current step.",
        ),
    ] = 0.5,
    bank_slots: Annotated[
        int, _opt("--bank-slots", help="STD: trajectory bank size; 0 = full teacher rollouts.")
    ] = 4,
    bank_prob: Annotated[
        float, _opt("--bank-prob", help="STD: probability ρ of continuing a stored trajectory.")
    ] = 0.7,
    adv_weight: Annotated[
        float | None,
        _opt(
            "--adv-weight",
            help="Adversarial loss weight (default 0.7 STD, 1.0 ADD); 0 turns it off.",
        ),
    ] = None,
    distill_weight: Annotated[
        float, _opt("--distill-weight", help="ADD: weight λ of the distillation loss.")
    ] = 2.5,
    teacher_cfg: Annotated[
        str | None,
        _opt(
            "--teacher-cfg",
            help="Teacher guidance range MIN,MAX drawn per sample (default 6,16 STD; 1,15 ADD).",
        ),
    ] = None,
    rank: Annotated[int, _opt("--rank", help="LoRA rank (α = rank).")] = 64,
    lr: Annotated[float, _opt("--lr", help="Learning rate of the LoRA.")] = 5e-6,
    disc_lr: Annotated[
        float, _opt("--disc-lr", help="Learning rate of the discriminator heads.")
    ] = 1e-4,
    batch_size: Annotated[int, _opt("--batch-size", help="Images per process per micro-step.")] = 1,
    grad_accum: Annotated[int, _opt("--grad-accum", help="Micro-steps per optimiser step.")] = 1,
    mixed_precision: Annotated[
        str,
        _opt(
            "--mixed-precision",
            help="no, fp16 or bf16 (frozen weights in it, the LoRA in fp32); default: accelerate's config.",
        ),
    ] = "",
    max_steps: Annotated[int, _opt("--max-steps", help="Optimiser steps to train.")] = 1000,
    warmup: Annotated[
        int, _opt("--warmup", help="Linear warm-up steps of the cosine schedule.")
    ] = 500,
    save_every: Annotated[
        int, _opt("--save-every", help="Write a resumable checkpoint every N steps (0: never).")
    ] = 0,
    checkpoints: Annotated[
        Path | None,
        _opt(
            "--checkpoints",
            help="Checkpoint folder (default: OUT's name + -checkpoints).",
            panel=FILES,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        _opt(
            "--resume",
            help="Continue exactly from a checkpoint folder (checkpoint-N).",
            panel=FILES,
        ),
    ] = None,
    log: Annotated[
        Path | None,
        _opt(
            "--log", help="Append one JSON line per step (step, losses, lr, seconds).", panel=FILES
        ),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        _opt(
            "--tensorboard",
            help="Also log to TensorBoard in this folder (if tensorboard is installed).",
            panel=FILES,
        ),
    ] = None,
    feature_net: Annotated[
        str,
        _opt("--feature-net", help="DINOv2 for the discriminator: hub id or folder.", panel=MODEL),
    ] = "facebook/dinov2-small",
    seed: Annotated[int, _opt("--seed", help="Seed of every random draw.")] = 0,
    quiet: Quiet = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Train a few-step LoRA on your images; multi-GPU with `accelerate launch -m stylekit distill`.

    Example: stylekit distill --teacher runwayml/stable-diffusion-v1-5 --data photos/ -o std.safetensors
    """
    with cli_errors():
        from stylekit.train.loop import DistillConfig, Progress

        cfg = DistillConfig(
            method=method,
            teacher=teacher,
            data=data,
            output=out,
            prompt=prompt,
            frames_per_video=frames_per_video,
            resolution=resolution,
            eta=eta,
            gamma=gamma,
            bank_slots=bank_slots,
            bank_prob=bank_prob,
            adv_weight=adv_weight,
            distill_weight=distill_weight,
            teacher_cfg=parse_range(teacher_cfg),
            rank=rank,
            lr=lr,
            disc_lr=disc_lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            mixed_precision=mixed_precision or None,
            max_steps=max_steps,
            warmup=warmup,
            save_every=save_every,
            checkpoints=checkpoints,
            resume=resume,
            log=log,
            tensorboard=tensorboard,
            feature_net=feature_net,
            seed=seed,
            allow_pickle=allow_pickle,
        )
        skipped: list[str] = []

        def skip(line: str) -> None:
            skipped.append(line)
            err.print(f"[yellow]skipped[/yellow] {escape(line)}", soft_wrap=True)

        summary = run_distill(cfg, Progress(skipped=skip), quiet=quiet)
        if summary is not None:
            err.print(
                f"wrote {escape(str(out))}: {summary['steps']} steps on {summary['images']} images, {summary['teacher_calls_per_step']:.1f} teacher UNet calls per step, {summary['seconds']:.0f} s",
                soft_wrap=True,
            )
        raise typer.Exit(1 if skipped else 0)


def parse_range(text: str | None) -> tuple[float, float] | None:
    """`MIN,MAX` as two floats (MIN <= MAX); None when not given."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--teacher-cfg {text!r}: expected MIN,MAX such as 6,16") from None
    if lo > hi or lo < 1:
        raise UsageError(f"--teacher-cfg {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def run_distill(cfg, progress, *, quiet: bool) -> dict | None:
    """Train with a rich progress bar (main process only); return the summary there, else None."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from stylekit.train.loop import distill as train

    main = os.environ.get("RANK", "0") == "0"  # set by accelerate launch / torchrun
    columns = (
        TextColumn("distill"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
    )
    with Progress(*columns, console=err, disable=quiet or not main) as bar:
        task = bar.add_task("distill", total=cfg.max_steps, losses="")

        def step(n: int, logs: dict) -> None:
            shown = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k not in ("lr", "seconds"))
            bar.update(task, completed=n, losses=shown)

        progress.step = step
        summary = train(cfg, progress)
    return summary if main else None


# --- plumbing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommonOptions:
    """What every batch command passes on alike: files, run, preset and the Settings flags given."""

    out: Path | None
    fmt: str | None
    suffix: str
    overwrite: bool
    seed: int | None
    dry_run: bool
    as_json: bool
    quiet: bool
    no_size_check: bool
    device: str
    dtype: str
    allow_pickle: bool
    model_config: str | None
    preset: str | None
    settings: Mapping[str, Any]  # Settings fields set on the command line, by field name

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> CommonOptions:
        """The shared options from a command's parameters (its `locals()`): the run and file
        options by name, and every Settings field the command has and the user set."""
        from stylekit.presets import Settings

        mine = {f.name for f in fields(cls)} - {"settings"}
        known = {f.name for f in fields(Settings)}
        flags = {SETTINGS_FIELD.get(k, k): v for k, v in params.items()}
        settings = given_settings(**{k: v for k, v in flags.items() if k in known})
        return cls(**{k: params[k] for k in mine}, settings=settings)

    def output(self):
        """Where and how the batch writes (`stylekit.runner.Output`)."""
        from stylekit.runner import Output

        return Output(self.out, self.fmt, self.suffix, self.overwrite, self.seed, self.dry_run)

    def runtime(self):
        """Device, dtype, loading permissions and the size check (`stylekit.api.Runtime`)."""
        from stylekit.api import Runtime

        return Runtime(
            self.device,
            self.dtype,
            self.allow_pickle,
            self.model_config,
            size_check=not self.no_size_check,
        )

    def events(self, kind=None):
        """Progress on stderr, `--json` records on stdout (`ConsoleEvents` unless `kind`); on
        --dry-run the plan on stdout (`dryrun.PlanEvents`)."""
        from stylekit.progress import ConsoleEvents

        if self.dry_run:
            from stylekit.dryrun import PlanEvents

            kind = PlanEvents
        kind = kind or ConsoleEvents
        return kind(err, as_json=self.as_json, quiet=self.quiet, debug=debug_mode())


def given_settings(**flags) -> dict[str, Any]:
    """The Settings fields given as flags, by field name: unset ones (None) left out, lists as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items() if v is not None}


def style_paths(style: list[Path] | None) -> list[str]:
    """The --style references as path strings (none if not given)."""
    return [str(p) for p in style or ()]


def parse_size_flag(size: str | None) -> tuple[int, int] | None:
    """--size WxH as (W, H); None when not given."""
    from stylekit.media.images import parse_size

    return parse_size(size) if size else None


def check_max_size(max_size: int | None) -> int | None:
    """--max-size as given; refuse one under 8 px."""
    if max_size is not None and max_size < 8:
        raise UsageError(f"--max-size must be at least 8, got {max_size}")
    return max_size


def exit_with(events, report) -> NoReturn:
    """Print the batch summary, then exit with the report's code (0 all done, 1 some failed)."""
    events.summary(report)
    raise typer.Exit(report.exit_code())


def debug_mode() -> bool:
    """Whether the global `--debug` was given to this invocation (set by `main_options`)."""
    return DEBUG["on"]


class cli_errors:
    """One red line and the right exit code for any error: a StylekitError's own code, 2 for an
    unexpected exception (the run stopped), 130 on Ctrl-C; `--debug` adds the traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        passing = (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException)
        if exc is None or isinstance(exc, (*passing, click.exceptions.Abort, SystemExit)):
            return False  # exit codes and click's own usage errors (typer.Exit is a RuntimeError)
        if isinstance(exc, KeyboardInterrupt):
            err.print("[yellow]interrupted[/yellow]: finished outputs are kept; rerun to resume")
            raise typer.Exit(130)
        if isinstance(exc, BrokenPipeError):  # stdout's reader left (`| head`): stop quietly
            quiet_stdout()
            raise typer.Exit(0)
        if debug_mode():
            from stylekit.progress import print_traceback

            print_traceback(err, exc)
        if isinstance(exc, StylekitError):
            err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        hint = "" if debug_mode() else " (stylekit --debug ... shows the traceback)"
        err.print(f"[red]error:[/red] {escape(one_line(exc))}{hint}", soft_wrap=True)
        raise typer.Exit(2)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except BrokenPipeError:  # printed outside a command (help, version) into a closed pipe
        quiet_stdout()
        sys.exit(0)


if __name__ == "__main__":
    main()
