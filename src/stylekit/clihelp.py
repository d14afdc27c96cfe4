"""`--help` laid out for an 80-column terminal, for every command the CLI has now or gains later.

Typer's rich help puts long names, short names, negative names, a type label and the help in six
columns, which at 80 columns truncates `--no-ad-checkpointing` and squeezes the help into a narrow
strip, and labels flags `<bool>`. Here each option is one row of two columns, names and help; a
name too long for its column gets a line of its own with the help below it, click's way. The
rules, applied to every option without editing it:

- metavar: none on flags; the option's own `metavar` if it has one; otherwise its Python type
  (INT, FLOAT, TEXT, PATH; a list shows its item type, since the option repeats);
- default: the declared one; where the declaration is None (the preset decides) and the setting is
  one a user tunes, the value that will be used: a value the command fixes (textures' CFG 1), else
  "from the preset (std-sdxl: 8)";
- a command with `--preset` says which preset it uses when none is given.

Only click's stable parameter attributes (opts, secondary_opts, help, default, required, hidden,
metavar, is_flag) and typer's `rich_help_panel` are read, plus the command function's annotations.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import typer.core
from rich.console import Console, Group
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

NAME_COLUMN = 26  # at most this many columns of names; longer names go on a line of their own
MAX_WIDTH = 100  # wider help lines are harder to read, whatever the terminal
# Settings whose effective default the help shows (their flags default to None: the preset decides)
SHOWN_SETTINGS = (
    "model",
    "scheduler",
    "steps",
    "strength",
    "cfg",
    "gamma",
    "style_mode",
    "style_scale",
    "ad_iters",
    "ad_lr",
)
TYPE_METAVAR = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


class HelpCommand(typer.core.TyperCommand):
    """A Typer command whose `--help` is `render_command`'s."""

    def format_help(self, ctx, formatter) -> None:
        help_console().print(render_command(self, ctx))


class HelpGroup(typer.core.TyperGroup):
    """The Typer group (`stylekit --help`, `stylekit SUBAPP --help`) rendered like the commands.

    A sub-app added with `add_typer` is usually a plain `typer.Typer`, whose commands Typer builds
    as plain `TyperCommand`s: those are given this module's help here, as the group is built."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            if type(command) is typer.core.TyperCommand:
                command.__class__ = HelpCommand  # adds format_help only: no state to set up

    def format_help(self, ctx, formatter) -> None:
        help_console().print(render_group(self, ctx))


class App(typer.Typer):
    """`typer.Typer` whose commands, group and sub-apps render their help with this module."""

    def __init__(self, **kwargs):
        super().__init__(cls=kwargs.pop("cls", HelpGroup), **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or HelpCommand, **kwargs)

    def add_typer(self, typer_instance, *args, cls=None, **kwargs):
        return super().add_typer(typer_instance, *args, cls=cls or HelpGroup, **kwargs)


def help_console() -> Console:
    """A console for help on stdout: the terminal's width (COLUMNS, else 80), at most MAX_WIDTH."""
    console = Console(highlight=False)
    console.width = min(console.width, MAX_WIDTH)
    return console


# --- one command ------------------------------------------------------------------------------
def render_command(command, ctx) -> Group:
    """Usage, the docstring, the default preset, then one panel of options per help panel."""
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    hints = annotations(command.callback)
    rows = {p.name: option_row(p, hints.get(p.name), command.name) for p in params}
    arguments = [rows[p.name][0] for p in params if p.param_type_name == "argument"]
    parts = [usage(ctx, "[OPTIONS]", *arguments), *paragraphs(command.help)]
    if any(p.name == "preset" for p in params):
        parts.append(Padding(Text(preset_line(), style="dim"), (0, 0, 1, 0)))
    width = min(NAME_COLUMN, max((len(name) for name, _ in rows.values()), default=0))
    for title, members in panels(params):
        parts.append(panel(title, [rows[p.name] for p in members], width))
    return Group(*parts)


def usage(ctx, *pieces: str) -> Padding:
    return Padding(Text(f"Usage: {ctx.command_path} {' '.join(pieces)}"), (1, 0, 1, 0))


def paragraphs(text: str | None) -> list:
    """The command's docstring: first paragraph plain, the rest (examples) dim, lines kept."""
    if not text:
        return []
    blocks = inspect.cleandoc(text).split("\n\n")
    return [
        Padding(Text(block, style="" if i == 0 else "dim"), (0, 0, 1, 0))
        for i, block in enumerate(blocks)
    ]


def preset_line() -> str:
    from stylekit.presets import DEFAULT_PRESET

    return (
        f"Settings not given here come from the preset {DEFAULT_PRESET} "
        "(--preset to change it; `stylekit presets` lists them)."
    )


def panels(params: list) -> list[tuple[str, list]]:
    """(title, params) in order of first appearance; arguments first, ungrouped options last."""
    groups: dict[str, list] = {}
    for p in params:
        if p.param_type_name == "argument":
            groups.setdefault("Arguments", []).append(p)
    for p in params:
        if p.param_type_name != "argument":
            groups.setdefault(getattr(p, "rich_help_panel", None) or "", []).append(p)
    ordered = {"Arguments": groups.pop("Arguments", [])} | groups
    if "" in ordered:
        ordered["Options"] = ordered.pop("")
    return [(title, members) for title, members in ordered.items() if members]


def panel(title: str, rows: list[tuple[str, Text]], width: int) -> Panel:
    """Rows of (names, help): names in a `width` column, or on their own line when longer."""
    items: list = []
    for names, help_text in rows:
        if len(names) > width:
            items += [name_text(names), Padding(help_text, (0, 0, 0, width + 2))]
            continue
        grid = Table.grid(padding=(0, 2))
        grid.add_column(width=width, no_wrap=True)
        grid.add_column(ratio=1)
        grid.add_row(name_text(names), help_text)
        items.append(grid)
    return Panel(Group(*items), title=title, title_align="left", border_style="dim")


def name_text(names: str) -> Text:
    """Option names in bold cyan, the metavar after them in yellow."""
    text = Text()
    for i, word in enumerate(names.split(" ")):
        text.append(" " if i else "")
        text.append(word, style="yellow" if word.isupper() else "bold cyan")
    return text


# --- one option ---------------------------------------------------------------------------------
def option_row(param, hint, command: str | None) -> tuple[str, Text]:
    """(names with metavar, help with its default and `[required]`) of one parameter."""
    label = metavar(param, hint)
    if param.param_type_name == "argument":
        names = label or (param.name or "").upper()
        names += "..." if param.nargs == -1 and not names.endswith("...") else ""
    else:
        shorts = [o for o in param.opts if not o.startswith("--")]
        longs = [o for o in param.opts if o.startswith("--")]
        names = ", ".join(shorts + longs)
        if param.secondary_opts:
            names += " / " + ", ".join(param.secondary_opts)
        names += f" {label}" if label else ""
    help_text = Text(" ".join((param.help or "").split()))
    extra = [default_text(param, command)] + (["required"] if param.required else [])
    extra = [e for e in extra if e]
    if extra:
        help_text.append((" " if help_text else "") + f"[{'; '.join(extra)}]", style="dim")
    return names, help_text


def metavar(param, hint) -> str:
    """The metavar policy: none on flags, the declared one, else the Python type's."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if param.metavar:
        return param.metavar
    kind = base_type(hint)
    return TYPE_METAVAR.get(kind, getattr(kind, "__name__", "VALUE").upper())


def base_type(hint) -> Any:
    """int for `int | None`, Path for `list[Path] | None`, the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return base_type(args[0]) if len(args) == 1 else hint
    if typing.get_origin(hint) in (list, tuple) and args:
        return base_type(args[0])
    return hint


def annotations(callback: Callable | None) -> dict[str, Any]:
    """The command function's parameter types (Annotated metadata dropped); {} if unknown."""
    if callback is None:
        return {}
    try:
        return typing.get_type_hints(inspect.unwrap(callback))
    except (NameError, TypeError):
        return {}


def default_text(param, command: str | None) -> str:
    """`default: …` for the help: the declared default, or the value the run will use."""
    if param.param_type_name == "argument" or getattr(param, "show_default", True) is False:
        return ""
    value = param.default
    if value is None:
        return effective_default(param, command)
    if getattr(param, "is_flag", False):
        if param.secondary_opts:  # --keep-size/--no-keep-size: name the one in force
            return f"default: {(param.opts if value else param.secondary_opts)[0]}"
        return ""
    if value in ("", (), []) or callable(value):
        return ""
    return f"default: {value}"


def effective_default(param, command: str | None) -> str:
    """For a Settings flag left unset: the value the command fixes, else the default preset's."""
    from stylekit.presets import COMMAND_DEFAULTS, DEFAULT_PRESET, load_preset

    field = settings_field(param.name)
    fixed = COMMAND_DEFAULTS.get(command or "", {})
    if field in fixed:
        value = fixed[field]
        if isinstance(value, bool):
            return f"default: {(param.opts if value else param.secondary_opts)[0]}"
        return f"default: {value}"
    if field not in SHOWN_SETTINGS:
        return ""
    value = getattr(load_preset(DEFAULT_PRESET), field)
    return f"default: from the preset ({DEFAULT_PRESET}: {value})"


def settings_field(param_name: str | None) -> str:
    """The Settings field a flag sets (`--adain` sets `ad_adain`)."""
    from stylekit.presets import SETTINGS_FIELD

    return SETTINGS_FIELD.get(param_name or "", param_name or "")


# --- the group ----------------------------------------------------------------------------------
def render_group(group, ctx) -> Group:
    """Usage, the app's help, its own options, then one line per command."""
    parts = [usage(ctx, "[OPTIONS] COMMAND [ARGS]..."), *paragraphs(group.help)]
    params = [p for p in group.get_params(ctx) if not getattr(p, "hidden", False)]
    rows = [option_row(p, None, None) for p in params]
    width = min(NAME_COLUMN, max((len(n) for n, _ in rows), default=0))
    parts.append(panel("Options", rows, width))
    commands = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not getattr(command, "hidden", False):
            first = inspect.cleandoc(command.help or "").split("\n\n")[0]
            commands.append((name, Text(" ".join(first.split()))))
    width = min(NAME_COLUMN, max((len(n) for n, _ in commands), default=0))
    parts.append(panel("Commands", commands, width))
    return Group(*parts)
