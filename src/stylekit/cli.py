"""The `stylekit` command: parse, call the library, print. torch is imported only inside commands.

Exit codes: 0 all done, 1 some inputs failed, 2 usage or setup error (nothing could start),
130 interrupted. Every error is one line; the global `--debug` adds its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console

from stylekit import __version__
from stylekit.errors import StylekitError, UsageError, one_line

app = typer.Typer(
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
        help="ad (default here) or none; with references, ipadapter and both too.",
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
        help="none (fresh noise each frame), noise (fixed noise), anchor (also attend to an anchor frame).",
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
TextureMode = Annotated[
    str | None,
    typer.Option(
        "--mode",
        help="sample (few-step, AD-guided) or optimize (AD's optimisation from noise: slow).",
        rich_help_panel=STYLE,
    ),
]


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
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
) -> None:
    """Stylise images with a few-step model, optionally after a style reference.

    Example: stylekit stylize photos/ --style ref.jpg --steps 4 -o styled/
    Full resolution: stylekit stylize big.jpg --tiled [--upscale 2]
    """
    common = CommonOptions.of(locals())
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
            report = api.stylize(
                inputs,
                style=style_paths(style),
                preset=common.preset,
                output=common.output(),
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
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
) -> None:
    """Generate images from a prompt in the style of reference images (AD-guided, few steps).

    Example: stylekit t2i-styled "a lighthouse at dusk" --style ref.jpg -n 4 --steps 4
    """
    common = CommonOptions.of(locals())
    with cli_errors():
        wh = parse_size_flag(size)
        from stylekit import api

        with common.events() as events:
            report = api.t2i_styled(
                prompt_text,
                style=style_paths(style),
                count=count,
                preset=common.preset,
                output=common.output(),
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
    content_weight: ContentWeight = None,
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
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
) -> None:
    """Repaint the white part of a mask with a few-step model; every other pixel stays as it was.

    Example: stylekit inpaint photo.jpg --mask mask.png -p "a red door" --steps 4 -o out/
    Full resolution: stylekit inpaint big.jpg --mask mask.png --tiled
    """
    common = CommonOptions.of(locals())
    with cli_errors():
        wh, longest = parse_size_flag(size), check_max_size(max_size)
        from stylekit import api
        from stylekit.tasks.stylize import Tiled

        if not tiled and (window is not None or stride is not None):
            raise UsageError("--window and --stride need --tiled")
        tiling = Tiled(1.0, window, stride, view_batch) if tiled else None

        with common.events() as events:
            report = api.inpaint(
                inputs,
                mask=str(mask),
                invert_mask=invert_mask,
                mask_blur=mask_blur,
                mask_padding=mask_padding,
                style=style_paths(style),
                preset=common.preset,
                output=common.output(),
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
    content_weight: ContentWeight = None,
    ad_checkpointing: AdCheckpointing = None,
    seed: Seed = None,
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
) -> None:
    """Stylise videos frame by frame; audio and the exact frame rate are kept.

    Example: stylekit video clip.mp4 --style ref.jpg --consistency anchor -o styled/
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
    style_mode: AdStyleMode = None,
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
    """Expand exemplars into textures of any size (MultiDiffusion + AD guidance, few steps).

    Example: stylekit texture-expand brick.png --size 1536x512 --seamless x -o textures/
    """
    common = CommonOptions.of(locals())
    with cli_errors():
        wh, longest = parse_size_flag(size), check_max_size(max_size)
        from stylekit import api

        with common.events() as events:
            report = api.texture_expand(
                inputs,
                size=wh,
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
    style_mode: AdStyleMode = None,
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
def presets() -> None:
    """List the built-in presets, one line each."""
    from stylekit.presets import list_presets

    with cli_errors():
        for name, description in list_presets():
            print(f"{name:<12} {description}")


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
        """Progress on stderr, `--json` records on stdout (`ConsoleEvents` unless `kind`)."""
        from stylekit.progress import ConsoleEvents

        kind = kind or ConsoleEvents
        return kind(err, as_json=self.as_json, quiet=self.quiet, debug=debug_mode())


SETTINGS_FIELD = {"lora": "loras", "adain": "ad_adain"}  # flag parameter → Settings field


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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        sys.exit(130)


if __name__ == "__main__":
    main()
