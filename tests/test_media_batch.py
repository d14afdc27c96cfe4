"""Tests for stylekit.media.batch: inputs, output naming, skipping, atomic writes, reports."""

from __future__ import annotations

import glob
from pathlib import Path, PurePath

import pytest

from stylekit.errors import UsageError
from stylekit.media.batch import (
    DEFAULT_OUT_DIR,
    BatchReport,
    InputItem,
    Job,
    _glob_base,
    _recursive_glob,
    atomic_write,
    collect_inputs,
    output_format,
    plan_outputs,
    split_existing,
)


def touch(root: Path, *names: str) -> None:
    """Create small files (content = their name) under `root`, making folders as needed."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)


def rels(items: list[InputItem]) -> list[str]:
    """Return the relative output locations of items as posix strings."""
    return [item.rel.as_posix() for item in items]


def outputs(jobs: list[Job], root: Path) -> list[str]:
    """Return job outputs relative to `root` as posix strings."""
    return [job.output.relative_to(root).as_posix() for job in jobs]


# --- collecting ----------------------------------------------------------------------


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    touch(tmp_path / "in", "b.png", "a.JPG", "sub/c.webp", ".hidden.png", ".cache/d.png", "x.txt")
    items = collect_inputs([str(tmp_path / "in")])
    assert rels(items) == ["a.JPG", "b.png", "sub/c.webp"]
    assert items[2].path == tmp_path / "in" / "sub" / "c.webp"


def test_explicit_file_is_taken_as_given(tmp_path):
    touch(tmp_path, "notes.txt")
    items = collect_inputs([str(tmp_path / "notes.txt")])
    assert items == [InputItem(tmp_path / "notes.txt", PurePath("notes.txt"))]


def test_glob_mirrors_tree_under_its_base(tmp_path, monkeypatch):
    touch(tmp_path, "p/a.jpg", "p/x/b.jpg", "p/x/c.png", "top.jpg")
    monkeypatch.chdir(tmp_path)
    assert rels(collect_inputs(["p/**/*.jpg"])) == ["a.jpg", "x/b.jpg"]
    assert rels(collect_inputs(["*.jpg"])) == ["top.jpg"]


def test_duplicates_are_kept_once_in_spec_order(tmp_path, monkeypatch):
    touch(tmp_path, "d/a.png", "d/b.png")
    monkeypatch.chdir(tmp_path)
    items = collect_inputs(["d/b.png", "d", "./d/a.png", str(tmp_path)])
    assert [i.path.name for i in items] == ["b.png", "a.png"]


@pytest.mark.parametrize(
    "pattern",
    ["p/**", "p/**/*.jpg", "**/*.png", "p/**/x/*", "p/*/**/*.jpg", "**", "p/**/.h/*", "*/x/**/*"],
)
def test_recursive_glob_finds_what_python_glob_finds(tmp_path, monkeypatch, pattern):
    """Without links the walk-based `**` matches exactly what glob.glob(recursive=True) does,
    hidden names included (not matched by wildcards, matched when named)."""
    touch(tmp_path, "p/a.jpg", "p/x/b.jpg", "p/x/c.png", "p/x/y/d.jpg", "p/.h/e.jpg")
    touch(tmp_path, "p/x/.f.jpg", "top.png", ".hid/g.png")
    monkeypatch.chdir(tmp_path)
    ours = _recursive_glob(pattern, _glob_base(pattern), set())
    theirs = glob.glob(pattern, recursive=True)
    assert sorted(map(Path, ours)) == sorted(map(Path, theirs))


def test_output_folder_is_left_out_of_folders_and_globs(tmp_path, monkeypatch):
    touch(tmp_path, "p/a.png", "p/x/b.png", "p/out/a.png", "p/out/x/b.png")
    monkeypatch.chdir(tmp_path)
    for spec in ("p", "p/**/*.png", "p/*/*.png", "p/**"):
        items = collect_inputs([spec], exclude=Path("p/out"))
        assert "out" not in {i.rel.parts[0] for i in items}, spec
    assert rels(collect_inputs(["p"], exclude=Path("p/out"))) == ["a.png", "x/b.png"]
    # the output folder itself as the input: nothing to leave out but the folder itself
    assert rels(collect_inputs(["p/out"], exclude=Path("p/out"))) == ["a.png", "x/b.png"]
    # a link to the output folder is the output folder
    (tmp_path / "p" / "alias").symlink_to("out")
    assert rels(collect_inputs(["p"], exclude=Path("p/out"))) == ["a.png", "x/b.png"]


def test_folder_links_are_followed_once(tmp_path):
    touch(tmp_path, "data/a.png", "in/b.png")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "data")
    (tmp_path / "in" / "again").symlink_to(tmp_path / "data")
    (tmp_path / "in" / "up").symlink_to("..")
    (tmp_path / "in" / "broken").symlink_to(tmp_path / "nowhere")
    items = collect_inputs([str(tmp_path / "in")])
    assert rels(items) == ["again/a.png", "b.png"]  # `again` sorts before `linked`


@pytest.mark.parametrize("spec", ["missing.png", "*.gif", "empty"])
def test_spec_matching_nothing_is_a_usage_error(tmp_path, monkeypatch, spec):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=spec.replace("*", r"\*").replace(".", r"\.")):
        collect_inputs([spec])


# --- planning ------------------------------------------------------------------------


def test_folder_mirrors_tree_with_format_and_suffix(tmp_path):
    touch(tmp_path / "in", "a.jpg", "sub/b.webp")
    jobs = plan_outputs(
        collect_inputs([str(tmp_path / "in")]), out=tmp_path / "o", fmt="jpeg", suffix="_s"
    )
    assert outputs(jobs, tmp_path / "o") == ["a_s.jpg", "sub/b_s.jpg"]
    assert [job.index for job in jobs] == [0, 1]
    assert jobs[1].rel == PurePath("sub/b.webp")


def test_default_out_dir_and_format(tmp_path, monkeypatch):
    touch(tmp_path, "a.jpg")
    monkeypatch.chdir(tmp_path)
    jobs = plan_outputs(collect_inputs(["a.jpg"]), out=None, fmt=None)
    assert jobs[0].output == DEFAULT_OUT_DIR / "a.png" == Path("stylized/a.png")


def test_collisions_get_numbered_in_input_order(tmp_path):
    touch(tmp_path / "in", "a.jpg", "a.png", "A.webp", "a-1.png")
    items = collect_inputs([str(tmp_path / "in")])
    jobs = plan_outputs(items, out=tmp_path / "o", fmt="png")
    # sorted: A.webp, a-1.png, a.jpg, a.png
    assert outputs(jobs, tmp_path / "o") == ["A.png", "a-1.png", "a-2.png", "a-3.png"]


def test_single_output_file(tmp_path):
    touch(tmp_path, "a.png")
    items = collect_inputs([str(tmp_path / "a.png")])
    jobs = plan_outputs(items, out=tmp_path / "res" / "final.webp", fmt="webp", suffix="_x")
    assert jobs[0].output == tmp_path / "res" / "final.webp"
    with pytest.raises(UsageError, match="is a webp file but --format is png"):
        plan_outputs(items, out=tmp_path / "res" / "final.webp", fmt="png")
    with pytest.raises(UsageError, match="use one of"):
        plan_outputs(items, out=tmp_path / "final.bmp", fmt=None)
    with pytest.raises(UsageError, match="writes a folder"):
        plan_outputs(items, out=tmp_path / "final.png", fmt=None, single_file_ok=False)


def test_output_file_with_many_inputs_is_a_usage_error(tmp_path):
    touch(tmp_path, "a.png", "b.png")
    items = collect_inputs([str(tmp_path)])
    with pytest.raises(UsageError, match="2 inputs"):
        plan_outputs(items, out=tmp_path / "out.png", fmt=None)


def test_output_never_overwrites_an_input(tmp_path):
    touch(tmp_path, "a.png", "b.jpg")
    items = collect_inputs([str(tmp_path)])
    with pytest.raises(UsageError, match=r"would overwrite input .*a\.png"):
        plan_outputs(items, out=tmp_path, fmt="png")
    with pytest.raises(UsageError, match="would overwrite"):
        plan_outputs(items[:1], out=tmp_path / "a.png", fmt=None)
    assert outputs(plan_outputs(items, out=tmp_path, fmt="png", suffix="_s"), tmp_path) == [
        "a_s.png",
        "b_s.png",
    ]


def test_bad_format_and_out_is_a_file(tmp_path):
    touch(tmp_path, "a.png", "taken")
    items = collect_inputs([str(tmp_path / "a.png")])
    assert output_format("AUTO") == "png"
    with pytest.raises(UsageError, match="'gif'"):
        plan_outputs(items, out=tmp_path / "o", fmt="gif")
    with pytest.raises(UsageError, match="not a folder"):
        plan_outputs(items, out=tmp_path / "taken", fmt="png")


def test_split_existing(tmp_path):
    touch(tmp_path / "in", "a.png", "b.png")
    touch(tmp_path / "o", "a.png")
    jobs = plan_outputs(collect_inputs([str(tmp_path / "in")]), out=tmp_path / "o", fmt="png")
    to_do, skipped, blocked = split_existing(jobs)
    assert [j.input.name for j in to_do] == ["b.png"]
    assert [j.input.name for j in skipped] == ["a.png"]
    assert blocked == []
    assert split_existing(jobs, overwrite=True) == (jobs, [], [])


def test_only_a_regular_file_is_finished_work(tmp_path):
    """A folder where a file goes (or a file where a frames folder goes) is neither done nor
    replaceable: blocked, with the reason, with or without overwrite."""
    touch(tmp_path / "in", "a.png", "b.png", "c.png")
    touch(tmp_path / "o", "a.png", "b.png/x")
    jobs = plan_outputs(collect_inputs([str(tmp_path / "in")]), out=tmp_path / "o", fmt="png")
    for overwrite in (False, True):
        to_do, skipped, blocked = split_existing(jobs, overwrite=overwrite)
        assert [j.input.name for j in to_do] == (["a.png", "c.png"] if overwrite else ["c.png"])
        assert [j.input.name for j in skipped] == ([] if overwrite else ["a.png"])
        assert [(j.input.name, reason.split(";")[0]) for j, reason in blocked] == [
            ("b.png", f"{tmp_path / 'o' / 'b.png'} exists and is a folder")
        ]
    frames = [Job(j.input, j.output, j.rel, j.index, folder=True) for j in jobs]
    _, skipped, blocked = split_existing(frames)
    assert [j.input.name for j in skipped] == ["b.png"]
    assert [(j.input.name, "not a folder" in reason) for j, reason in blocked] == [("a.png", True)]


# --- writing and reporting -----------------------------------------------------------


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "deep" / "out.png"
    with atomic_write(target) as f:
        f.write(b"new")
        assert [p.name[0] for p in target.parent.iterdir()] == ["."]
        assert next(target.parent.iterdir()).name.endswith(".part")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["out.png"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_atomic_write_interrupted_leaves_target_untouched(tmp_path, error):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_write(target) as f:
            f.write(b"half")
            raise error()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_batch_report(tmp_path):
    jobs = [
        Job(tmp_path / f"{n}.png", tmp_path / "o" / f"{n}.png", PurePath(f"{n}.png"), n)
        for n in range(3)
    ]
    report = BatchReport()
    report.add_done(jobs[0])
    report.add_skipped(jobs[1])
    assert report.exit_code() == 0
    report.add_failed(jobs[2], ValueError("bad pixels"))
    assert report.failed == [(jobs[2].input, "bad pixels")]
    assert report.summary() == "1 done, 1 skipped, 1 failed"
    assert report.exit_code() == 1


def test_no_specs_is_a_usage_error():
    with pytest.raises(UsageError, match="no inputs"):
        collect_inputs([])
