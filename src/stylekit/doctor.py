"""`stylekit doctor`: what this machine has for a run, on one screen, and whether a preset can run.

Versions of the libraries a run loads; the devices, the dtype `--dtype auto` would pick there and
why; free memory; the ffmpeg video commands use and its encoders; the Hugging Face cache, offline
mode and the presets it holds completely; whether the output folder can be written.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from stylekit.errors import UsageError

LIBRARIES = ("stylekit", "torch", "diffusers", "transformers", "peft", "huggingface_hub")
ENCODERS = ("libx264", "aac")  # what `stylekit video` writes by default: H.264 video, AAC audio


@dataclass
class Report:
    """Every finding (JSON-ready) and the problems that stop the checked preset from running."""

    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return self.facts | {"ok": self.ok, "problems": self.problems, "warnings": self.warnings}


def versions() -> dict[str, str | None]:
    """Installed version of each library a run loads (None: not installed)."""
    from stylekit import __version__

    found: dict[str, str | None] = {"stylekit": __version__}
    for name in LIBRARIES[1:]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def devices() -> dict:
    """The device `auto` picks, the dtype `auto` picks there and why, and each device's memory."""
    import torch

    from stylekit.engine import memory, models

    chosen = models.resolve_device("auto")
    found = [{"device": "cpu", "free": memory.system_available(), "bf16": models.cpu_has_bf16()}]
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        name = torch.cuda.get_device_name(i)
        found.append({"device": f"cuda:{i}", "name": name, "free": free, "total": total})
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append({"device": "mps", "free": memory.system_available()})
    dtype = models.resolve_dtype("auto", chosen)
    return {
        "auto": chosen.type,
        "dtype": next(k for k, v in models.DTYPES.items() if v == dtype),
        "dtype_reason": models.auto_dtype_reason(chosen),
        "devices": found,
    }


def ffmpeg() -> dict:
    """imageio-ffmpeg's ffmpeg: its path, version line and whether it has the default encoders."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        version = run([exe, "-hide_banner", "-version"]).splitlines()[0].split(" Copyright")[0]
        listed = run([exe, "-hide_banner", "-encoders"])
    except (ImportError, RuntimeError, OSError, IndexError) as exc:
        return {"path": None, "version": None, "encoders": {}, "error": str(exc)}
    names = set(re.findall(r"^\s*[VAS][\w.]{5}\s+(\S+)", listed, flags=re.M))
    return {"path": exe, "version": version, "encoders": {e: e in names for e in ENCODERS}}


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout


def cache(cache_dir: str | Path | None) -> dict:
    """The hub cache, offline mode, and each built-in preset's state in the cache."""
    from stylekit import hubfiles
    from stylekit.engine import hub
    from stylekit.presets import builtin_names

    presets = {}
    for name in builtin_names():
        st = hubfiles.preset_status(name, cache_dir)
        presets[name] = {
            "complete": st.complete,
            "model_cached": st.model_cached,
            "missing": len(st.missing),
            "bytes": st.bytes,
        }
    return {"cache": str(hub.cache_dir(cache_dir)), "offline": hub.offline(), "presets": presets}


def writable(folder: Path) -> str | None:
    """Why outputs cannot be written under `folder`, or None when they can."""
    from stylekit.media.batch import check_writable

    try:
        check_writable([folder / "probe.png"])
    except UsageError as exc:
        return str(exc)
    return None


def diagnose(
    *, preset: str | None = None, out: Path | None = None, cache_dir: str | Path | None = None
) -> Report:
    """Look at everything and decide whether `preset` (default: the default preset) can run."""
    from stylekit import hubfiles
    from stylekit.engine import hub
    from stylekit.media.batch import DEFAULT_OUT_DIR
    from stylekit.presets import DEFAULT_PRESET

    report = Report()
    report.facts["versions"] = found = versions()
    missing = [name for name, v in found.items() if v is None and name != "stylekit"]
    if missing:
        report.problems.append(f"not installed: {', '.join(missing)}")
        return report
    report.facts["device"] = devices()
    report.facts["ffmpeg"] = video = ffmpeg()
    if video["path"] is None:
        report.warnings.append(f"no ffmpeg ({video.get('error')}): `stylekit video` cannot run")
    for name, there in video["encoders"].items():
        if not there:
            report.warnings.append(
                f"ffmpeg has no {name} encoder: pass --codec to `stylekit video`"
            )
    report.facts["hub"] = cache(cache_dir)
    folder = Path(out) if out is not None else DEFAULT_OUT_DIR
    reason = writable(folder)
    report.facts["output"] = {"folder": str(folder), "writable": reason is None}
    if reason:
        report.problems.append(reason)
    name = preset or DEFAULT_PRESET
    settings = hubfiles.settings_for(name)
    plan = hubfiles.resolve_all(
        settings, listing=lambda r, rev: hubfiles.cached_listing(r, rev, cache_dir)
    )
    report.facts["preset"] = {"name": name, "complete": not plan.missing, "missing": plan.missing}
    if plan.missing:
        line = hubfiles.missing_line(plan, f"preset {name}")
        if hub.offline():
            report.problems.append(line + " (HF_HUB_OFFLINE is set)")
        else:
            what = "its model is" if plan.family is None else f"{len(plan.missing)} file(s) are"
            report.warnings.append(
                f"preset {name}: {what} not cached; the first run downloads them "
                f"(or `stylekit models pull {name}` now)"
            )
    return report


def lines(report: Report) -> list[str]:
    """The report as one screen of text."""
    from stylekit.hubfiles import human

    f = report.facts
    out = ["versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in f["versions"].items())]
    if "device" in f:
        d = f["device"]
        out.append(f"device: auto picks {d['auto']}, dtype {d['dtype']} ({d['dtype_reason']})")
        for dev in d["devices"]:
            name = f" {dev['name']}" if dev.get("name") else ""
            total = f" of {human(dev['total'])}" if dev.get("total") else ""
            out.append(f"  {dev['device']}{name}: {human(dev['free'])} free{total}")
    if "ffmpeg" in f:
        v = f["ffmpeg"]
        enc = ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in v["encoders"].items())
        out.append(f"ffmpeg: {v['path']}")
        out.append(f"  {v['version']}; encoders: {enc}")
    if "hub" in f:
        h = f["hub"]
        out.append(
            f"hugging face cache: {h['cache']} (offline mode {'on' if h['offline'] else 'off'})"
        )
        for name, st in h["presets"].items():
            state = "complete" if st["complete"] else f"{st['missing']} file(s) missing"
            state = state if st["model_cached"] else "model not cached"
            out.append(f"  {name:<12} {state:<22} {human(st['bytes'])}")
    if "output" in f:
        o = f["output"]
        out.append(
            f"output folder: {o['folder']} ({'writable' if o['writable'] else 'NOT writable'})"
        )
    out.extend(f"warning: {w}" for w in report.warnings)
    out.extend(f"problem: {p}" for p in report.problems)
    name = f.get("preset", {}).get("name", "the default preset")
    out.append(
        f"ready: preset {name} can run" if report.ok else f"not ready: preset {name} cannot run"
    )
    return out
