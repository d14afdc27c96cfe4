"""Every command's `--help` at COLUMNS=80: whole option names, readable help, the defaults a run
will use. The checks loop over the commands and options the CLI has, so options added later are
held to the same rules without touching this file."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from stylekit.cli import app
from stylekit.presets import COMMAND_DEFAULTS, DEFAULT_PRESET, SETTINGS_FIELD, load_preset

RUNNER = CliRunner()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)


def command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-app, as the words that name it (`("models", "pull")`)."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if hasattr(command, "commands"):
            paths += command_paths(command, (*prefix, name))
    return paths


def command_at(path: tuple[str, ...]):
    command = GROUP
    for word in path:
        command = command.commands[word]
    return command


TUNED = ("steps", "strength", "cfg", "scheduler", "gamma", "style_scale", "ad_iters", "ad_lr")
HELP_COLUMN = 32  # a wrapped help line starts at most here: the help keeps >= 46 of 80 columns


def help_text(*argv: str) -> str:
    result = RUNNER.invoke(app, [*argv, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, (argv, result.output, result.exception)
    return result.stdout


def flat(text: str) -> str:
    """The help without panel borders, whitespace collapsed: each option's help reads whole."""
    lines = [line.strip().strip("│").strip() for line in text.splitlines()]
    return " ".join(" ".join(line for line in lines if line[:1] not in "╭╰").split())


def options(name: str):
    return [p for p in GROUP.commands[name].params if p.param_type_name == "option"]


@pytest.mark.parametrize("path", [(), *command_paths(GROUP)], ids=" ".join)
def test_help_fits_80_columns_with_whole_names_and_no_type_labels(path):
    text, name = help_text(*path), path
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text
    assert not re.search(r"(?<!\S)<\w+(\[[^\]]*\])?>(?!\S)", text), text  # <bool>, <list[str]>
    params = command_at(path).params
    flattened = flat(text)
    for param in params:
        if param.param_type_name != "option":
            assert (param.metavar or param.name.upper()) in text
            continue
        for opt in [*param.opts, *param.secondary_opts]:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (name, opt)
        if param.help:
            assert " ".join(param.help.split()) in flattened, (name, param.name)
    for line in text.splitlines():
        wrapped = re.match(r"│( +)\S", line)
        if wrapped:  # a continuation line of some option's help
            assert len(wrapped.group(1)) <= HELP_COLUMN, line


@pytest.mark.parametrize("name", COMMANDS)
def test_flags_carry_no_metavar_and_values_do(name):
    text = help_text(name)
    for param in options(name):
        long = [o for o in param.opts if o.startswith("--")][0]
        row = rf"^│ (?:-\w, )?{re.escape(long)}(?: / [-\w]+)?(?: ([A-Z]+))?(?: |$)"
        follows = re.search(row, text, flags=re.MULTILINE)
        assert follows, (name, long)
        assert bool(follows.group(1)) != bool(param.is_flag), (name, long, follows.group(0))


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_the_defaults_a_run_will_use(name):
    """--steps, --cfg … show the default preset's value, or the value the command fixes; every
    command with --preset names the default preset."""
    flattened = flat(help_text(name))
    names = {p.name for p in options(name)}
    if "preset" not in names:
        return  # no preset behind its settings (distill): its help shows its own defaults
    assert f"come from the preset {DEFAULT_PRESET}" in flattened
    preset = load_preset(DEFAULT_PRESET)
    fixed = COMMAND_DEFAULTS.get(name, {})
    for field in TUNED:
        if field not in names:
            continue
        param = next(p for p in options(name) if SETTINGS_FIELD.get(p.name, p.name) == field)
        if field in fixed:
            shown = f"[default: {fixed[field]}]"
        else:
            shown = f"[default: from the preset ({DEFAULT_PRESET}: {getattr(preset, field)})]"
        assert f"{' '.join(param.help.split())} {shown}" in flattened, (name, field)
    assert "from the preset (std-sdxl: 8)" in flat(help_text("stylize"))


@pytest.mark.parametrize("name", COMMANDS)
def test_help_mentions_only_options_the_command_has(name):
    """An option's help that refers to `--other` must be on a command that has `--other`."""
    command = GROUP.commands[name]
    known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
    for param in command.params:
        for ref in re.findall(r"(?<![\w-])--[a-z][-a-z]*", param.help or ""):
            assert ref in known, (name, param.name, ref)


def test_help_that_used_to_be_wrong_for_its_command():
    by_name = {name: {p.name: p.help for p in options(name)} for name in COMMANDS}
    for name in ("inpaint", "video"):
        assert "--mode" not in by_name[name]["content_weight"]
    for name in ("texture-expand", "texture"):
        assert "reference" not in by_name[name]["style_mode"]
    assert "single input" not in by_name["t2i-styled"]["out"]
    assert "image" not in by_name["video"]["seed"] and "video" in by_name["video"]["seed"]


def test_commands_of_a_plain_sub_app_render_the_same():
    """`stylekit models pull`-style sub-apps are plain `typer.Typer`s: their help is ours too."""
    from stylekit.clihelp import App

    top, sub = App(name="top"), typer.Typer()

    @sub.command()
    def pull(force: bool = typer.Option(False, "--force", help="Fetch again.")) -> None:
        """Fetch."""

    @top.command()
    def other() -> None:
        """Other."""

    top.add_typer(sub, name="models")
    for argv in (["models", "--help"], ["models", "pull", "--help"]):
        result = RUNNER.invoke(top, argv, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.stdout and "Usage:" in result.stdout
    assert "--force Fetch again." in " ".join(result.stdout.replace("│", " ").split())
