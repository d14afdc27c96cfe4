"""`stylekit sweep`: the grid's cells are the single runs with those settings, made with one model
load; the contact sheet puts each cell under its column label and beside its row label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stylekit import session as session_module
from stylekit.cli import app
from stylekit.engine import models
from stylekit.errors import UsageError
from stylekit.media.metadata import read_metadata
from stylekit.media.sheet import contact_sheet, font_size, label, layout, text_size
from stylekit.sweep import Axis, parse_axis

RUNNER = CliRunner()


def tiny(model: Path) -> list[str]:
    return [
        *("--model", str(model), "--accelerator", "none"),
        *("--dtype", "fp32", "--device", "cpu", "--steps", "2", "-q"),
    ]


def write_image(path: Path, seed: int, size=(64, 64)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def crop(image: Image.Image, box) -> np.ndarray:
    return np.asarray(image.crop(box))


# --- parsing -----------------------------------------------------------------------------------


def test_vary_values_take_their_settings_type():
    assert parse_axis("strength=0.4,0.6") == Axis("strength", (0.4, 0.6))
    assert parse_axis("steps=2,4") == Axis("steps", (2, 4))
    assert parse_axis("style-scale=1") == Axis("style_scale", (1.0,))
    assert parse_axis("tiny_vae=on,off") == Axis("tiny_vae", (True, False))
    assert parse_axis("negative=none,blurry") == Axis("negative", (None, "blurry"))
    assert parse_axis("lora=a.safetensors,none") == Axis("loras", (("a.safetensors",), ()))
    assert parse_axis("prompt=a cat, at night|a dog") == Axis(
        "prompt", ("a cat, at night", "a dog")
    )
    assert parse_axis("seed=1,2") == Axis("seed", (1, 2))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("strenght=0.5", "unknown key 'strenght'"),
        ("steps=2,x", "'x' is not a int"),
        ("strength", "expected KEY=V1,V2"),
        ("cfg=1,1", "given twice"),
    ],
)
def test_bad_vary_is_a_usage_error(text, says):
    with pytest.raises(UsageError, match=says):
        parse_axis(text)


# --- the sheet ---------------------------------------------------------------------------------


def test_sheet_grid_size_and_labels_3x2():
    colours = [[(40 * c, 100 + 50 * r, 7) for c in range(3)] for r in range(2)]
    cells = [[Image.new("RGB", (80, 60), colours[r][c]) for c in range(3)] for r in range(2)]
    cols = ["strength = 0.4", "strength = 0.6", "strength = 0.8"]
    rows = ["style_scale = 0.5", "style_scale = 1"]
    sheet, plan = contact_sheet(cells, cols, rows)
    assert (plan.cols, plan.rows) == (3, 2)
    assert sheet.size == plan.size
    w, h = plan.cell
    widest = max(text_size(t, font_size(plan.cell))[0] for t in cols)
    assert plan.pitch == max(w, widest + 8)  # a label wider than its cell widens the column
    assert sheet.width == plan.label_w + 3 * (plan.pitch + 4) + 4
    assert sheet.height == plan.top + 2 * (h + 4) + 4
    for r in range(2):
        for c in range(3):
            box = plan.box(r, c)
            assert (crop(sheet, box) == colours[r][c]).all()
    size = font_size(plan.cell)
    for c, text in enumerate(cols):
        box = plan.col_label(c)
        drawn = crop(sheet, box)
        assert (drawn == np.asarray(label(text, (box[2] - box[0], box[3] - box[1]), size))).all()
        assert (drawn < 128).any()  # ink, not a blank band
        assert box[3] <= plan.box(0, c)[1]  # above its column
        assert box[0] <= plan.box(0, c)[0] and plan.box(0, c)[2] <= box[2]
    for r, text in enumerate(rows):
        box = plan.row_label(r)
        drawn = crop(sheet, box)
        assert (drawn == np.asarray(label(text, (box[2] - box[0], box[3] - box[1]), size))).all()
        assert box[2] <= plan.box(r, 0)[0]  # left of its row
    assert len({crop(sheet, plan.col_label(c)).tobytes() for c in range(3)}) == 3


def test_a_failed_cell_is_grey_and_a_title_sits_on_top():
    cells = [[Image.new("RGB", (32, 32), (0, 0, 255)), None]]
    sheet, plan = contact_sheet(cells, ["a = 1", "a = 2"], [], title="model = x")
    assert plan.rows == 1 and plan.label_w == 0 and plan.titled
    assert (crop(sheet, plan.box(0, 1)) == (200, 200, 200)).all()
    assert (crop(sheet, plan.title()) < 128).any()


# --- the model pool ----------------------------------------------------------------------------


def test_only_what_changes_the_weights_makes_a_new_load(monkeypatch):
    loads = []

    def fake_load(spec):
        loads.append(spec)
        accel = models.choose_accelerator(spec, "sdxl", False)
        return models.LoadedModel(
            object(), "sdxl", False, None, None, accel.source, (accel.notice,)
        )

    monkeypatch.setattr(session_module.models, "load", fake_load)
    pool = session_module.ModelPool()
    spec = models.ModelSpec("a/sdxl", strength=0.75)
    first = pool.load(spec)
    assert pool.load(models.ModelSpec("a/sdxl", strength=0.7)).pipe is first.pipe  # η 0.75 still
    assert pool.loads == 1
    reused = pool.load(models.ModelSpec("a/sdxl", strength=0.7))
    assert reused.notices == (
        models.choose_accelerator(models.ModelSpec("a/sdxl", strength=0.7), "sdxl", False).notice,
    )
    pool.load(models.ModelSpec("a/sdxl", strength=0.8))  # η 0.85: another LoRA
    assert pool.loads == 2
    pool.load(models.ModelSpec("a/sdxl", strength=0.8, task="noise"))  # TCD-LoRA from noise
    assert pool.loads == 3
    pool.load(models.ModelSpec("b/sdxl", strength=0.8, task="noise"))
    pool.load(models.ModelSpec("b/sdxl", strength=0.8, task="noise", tiny_vae=True))
    assert pool.loads == 5
    none = models.ModelSpec("b/sdxl", accelerator="none", strength=0.3)
    pool.load(none)
    pool.load(models.ModelSpec("b/sdxl", accelerator="none", strength=0.9, task="video"))
    assert pool.loads == 6


# --- end to end --------------------------------------------------------------------------------


def test_sweep_3x2_cells_are_the_single_stylize_runs(tmp_path, sd15_path, sd15_ip_adapter):
    photo, ref = write_image(tmp_path / "photo.png", 1), write_image(tmp_path / "ref.png", 2)
    style = ["--style", str(ref), "--ip-adapter", str(sd15_ip_adapter), "--style-mode", "ipadapter"]
    sheet = tmp_path / "out" / "sheet.png"
    result = RUNNER.invoke(
        app,
        [
            "sweep", str(photo), "--vary", "strength=0.4,0.6,0.8", "--vary", "style_scale=0.5,1.0",
            *style, *tiny(sd15_path), "--seed", "7", "-o", str(sheet), "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6 done, 0 skipped, 0 failed (cells); 1 model load(s)" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6 and {r["status"] for r in records} == {"done"}
    folder = tmp_path / "out" / "sheet"
    index = json.loads((folder / "cells.json").read_text())
    assert [a["key"] for a in index["axes"]] == ["strength", "style_scale"]
    assert len(index["cells"]) == 6
    meta = read_metadata(sheet)
    assert meta["columns"] == ["strength = 0.4", "strength = 0.6", "strength = 0.8"]
    assert meta["rows"] == ["style_scale = 0.5", "style_scale = 1"]
    with Image.open(sheet) as im:
        drawn = im.convert("RGB")
    cells = {}
    for record in records:
        place = record["settings"]["sweep"]
        cells[(place["row"], place["col"])] = (Path(record["output"]), place["values"])
        assert record["settings"]["strength"] == place["values"]["strength"]
        assert record["settings"]["style_scale"] == place["values"]["style_scale"]
    assert sorted(cells) == [(r, c) for r in range(2) for c in range(3)]
    plan = layout((64, 64), meta["columns"], meta["rows"])
    assert drawn.size == plan.size
    for (row, col), (path, values) in cells.items():
        with Image.open(path) as im:
            assert (crop(drawn, plan.box(row, col)) == np.asarray(im.convert("RGB"))).all()
        single = tmp_path / f"single-{row}-{col}.png"
        flags = ["--strength", str(values["strength"]), "--style-scale", str(values["style_scale"])]
        one = RUNNER.invoke(
            app,
            [
                "stylize",
                str(photo),
                *style,
                *tiny(sd15_path),
                *flags,
                "--seed",
                "7",
                "-o",
                str(single),
            ],
        )
        assert one.exit_code == 0, one.output
        assert path.read_bytes() == single.read_bytes()  # pixels and metadata
    again = RUNNER.invoke(
        app,
        [
            "sweep", str(photo), "--vary", "strength=0.4,0.6,0.8", "--vary", "style_scale=0.5,1.0",
            *style, *tiny(sd15_path), "--seed", "7", "-o", str(sheet),
        ],
    )  # fmt: skip
    assert again.exit_code == 0
    assert "0 done, 6 skipped, 0 failed (cells); 0 model load(s)" in again.stderr


def test_t2i_sweep_with_a_third_axis_makes_one_sheet_per_value(tmp_path, sd15_path):
    sheet = tmp_path / "grid.png"
    result = RUNNER.invoke(
        app,
        [
            "sweep", "a red house", "--command", "t2i-styled", "--size", "64x64",
            "--vary", "prompt=a red house|a blue car", "--vary", "cfg=1,2", "--vary", "seed=3,4",
            *tiny(sd15_path), "-o", str(sheet),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 done" in result.stderr and "1 model load(s)" in result.stderr
    pages = [tmp_path / "grid_seed-3.png", tmp_path / "grid_seed-4.png"]
    assert all(p.is_file() for p in pages) and not sheet.exists()
    assert read_metadata(pages[1])["sheet"] == "seed = 4"
    index = json.loads((tmp_path / "grid" / "cells.json").read_text())
    cell = next(
        c
        for c in index["cells"]
        if c["settings"]["sweep"]["values"] == {"prompt": "a blue car", "cfg": 2.0, "seed": 4}
    )
    single = tmp_path / "single.png"
    one = RUNNER.invoke(
        app,
        ["t2i-styled", "a blue car", "--size", "64x64", *tiny(sd15_path), "--cfg", "2",
         "--seed", "4", "-o", str(single)],
    )  # fmt: skip
    assert one.exit_code == 0, one.output
    assert (tmp_path / "grid" / cell["file"]).read_bytes() == single.read_bytes()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "at least one --vary"),
        (
            ["--vary", "steps=1", "--vary", "cfg=1", "--vary", "gamma=0", "--vary", "seed=1"],
            "at most 3",
        ),
        (["--vary", "strength=0.5", "--strength", "0.4"], "strength: given twice"),
        (["--vary", "seed=1,2", "--seed", "3"], "seed: given twice"),
        (["--vary", "strength=0.5,1.5"], "strength = 1.5 is outside"),
        (["--vary", "steps=1", "-o", "sheet.gif"], "gif"),
        (["--vary", "steps=1", "--command", "texture-expand"], "needs --size"),
        (
            ["--vary", "steps=1", "--command", "t2i-styled", "--max-pixels", "100"],
            "takes no --max-pixels",
        ),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, says):
    photo = write_image(tmp_path / "p.png", 0)
    result = RUNNER.invoke(app, ["sweep", str(photo), *args, "-q"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_cells_are_grouped_so_each_model_loads_once(tmp_path, sd15_path, sd2_path):
    """`model` across the columns alternates between the models in sheet order; the cells run
    grouped by model, so two models are two loads, not four."""
    photo = write_image(tmp_path / "photo.png", 3)
    flags = ["--accelerator", "none", "--dtype", "fp32", "--device", "cpu", "-q"]
    result = RUNNER.invoke(
        app,
        [
            "sweep", str(photo), "--vary", f"model={sd15_path},{sd2_path}", "--vary", "steps=1,2",
            *flags, "--style-mode", "none", "--seed", "1", "-o", str(tmp_path / "s.png"), "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 done, 0 skipped, 0 failed (cells); 2 model load(s)" in result.stderr
    ran = [json.loads(line)["settings"]["model"] for line in result.stdout.splitlines()]
    assert ran == [str(sd15_path)] * 2 + [str(sd2_path)] * 2
