"""The `stylekit` command: parse, call the library, print. torch is imported only inside commands.

Exit codes: 0 all done, 1 some inputs failed, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stylekit import __version__
from stylekit.errors import StylekitError, UsageError

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
        help="Few-step LoRA: auto (STD for SDXL, LCM-LoRA for SD1.5, none for turbo), none, or a LoRA.",
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
        help="CLIP image encoder folder for the IP-Adapter.",
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
    typer.Option("--size", help="Resize inputs to WxH (multiples of 8).", rich_help_panel=FILES),
]
MaxSize = Annotated[
    int | None,
    typer.Option(
        "--max-size", help="Shrink inputs so the longer side is at most N.", rich_help_panel=FILES
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
) -> None:
    """Batch image and video stylization and texture synthesis with few-step diffusion models."""


# --- commands ----------------------------------------------------------------------------------
@app.command()
def stylize(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (recursive) or globs.", show_default=False),
    ],
    style: Style = None,
    out: Out = None,
    preset: Preset = None,
    model: Model = None,
    lora: Lora = None,
    accelerator: Accelerator = None,
    tiny_vae: TinyVae = None,
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
    seed: Seed = None,
    size: Size = None,
    max_size: MaxSize = None,
    fmt: Format = None,
    suffix: Suffix = "",
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: Json = False,
    quiet: Quiet = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
    model_config: ModelConfig = None,
) -> None:
    """Stylise images with a few-step model, optionally after a style reference.

    Example: stylekit stylize photos/ --style ref.jpg --steps 4 -o styled/
    """
    overrides = dict(
        model=model,
        loras=tuple(lora) if lora else None,
        accelerator=accelerator,
        tiny_vae=tiny_vae,
        ip_adapter=ip_adapter,
        image_encoder=image_encoder,
        scheduler=scheduler,
        steps=steps,
        strength=strength,
        cfg=cfg,
        gamma=gamma,
        prompt=prompt,
        negative=negative,
        style_mode=style_mode,
        style_scale=style_scale,
    )
    run_batch(
        "stylize",
        inputs=inputs,
        style=[str(s) for s in style or []],
        preset=preset,
        overrides=overrides,
        output=output_options(out, fmt, suffix, overwrite, seed, dry_run),
        runtime=(device, dtype, allow_pickle, model_config),
        size=size,
        max_size=max_size,
        as_json=as_json,
        quiet=quiet,
    )


@app.command()
def presets() -> None:
    """List the built-in presets, one line each."""
    from stylekit.presets import list_presets

    with cli_errors():
        for name, description in list_presets():
            print(f"{name:<12} {description}")


# --- plumbing ----------------------------------------------------------------------------------
def output_options(out, fmt, suffix, overwrite, seed, dry_run):
    from stylekit.runner import Output

    return Output(out=out, fmt=fmt, suffix=suffix, overwrite=overwrite, seed=seed, dry_run=dry_run)


def run_batch(task: str, *, runtime, size, max_size, as_json, quiet, overrides, **kwargs) -> None:
    """Run one batch task with progress on stderr and records on stdout; exit with its code."""
    from stylekit.progress import ConsoleEvents

    with cli_errors():
        from stylekit.media.images import parse_size

        parsed = parse_size(size) if size else None
        if max_size is not None and max_size < 8:
            raise UsageError(f"--max-size must be at least 8, got {max_size}")
        from stylekit import api

        events = ConsoleEvents(err, as_json=as_json, quiet=quiet)
        with events:
            report = getattr(api, task)(
                runtime=api.Runtime(*runtime),
                size=parsed,
                max_size=max_size,
                events=events,
                **kwargs,
                **overrides,
            )
        events.summary(report)
        raise typer.Exit(report.exit_code())


class cli_errors:
    """One red line and the right exit code for StylekitError; 130 on Ctrl-C."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, StylekitError):
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(exc.exit_code)
        if isinstance(exc, KeyboardInterrupt):
            err.print("[yellow]interrupted[/yellow]: finished outputs are kept; rerun to resume")
            raise typer.Exit(130)
        return False


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
