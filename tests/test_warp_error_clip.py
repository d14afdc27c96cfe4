"""`benchmarks/warp_error.py --clip`: CLIP frame consistency with a tiny random CLIP vision model."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cv2")  # warp_error.py needs OpenCV (the bench extra)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import warp_error  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random `CLIPVisionModelWithProjection` (32 px, 16-d embeddings) and its processor."""
    from stylekit.testing import build_clip_vision

    return build_clip_vision(tmp_path_factory.mktemp("clip"), projection_dim=16, processor=True)


def frames(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(count)]


def test_clip_consistency_is_the_mean_cosine_of_consecutive_embeddings(tiny_clip):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    clip = frames(5, seed=1)
    embed = warp_error.clip_embedder(str(tiny_clip), batch=2)  # batches split the pairs
    got = warp_error.clip_consistency(iter(clip), embed)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip)
    net = CLIPVisionModelWithProjection.from_pretrained(tiny_clip).eval()
    with torch.no_grad():  # by hand: one batch, cosine of each consecutive pair, mean
        e = net(**processor(images=clip, return_tensors="pt")).image_embeds
    cos = torch.nn.functional.cosine_similarity(e[:-1], e[1:], dim=-1)
    assert got == pytest.approx(float(cos.mean()), abs=1e-5)
    assert got < 0.999  # random frames do not all look alike, even to a random CLIP
    still = warp_error.clip_consistency(iter([clip[0]] * 4), embed)
    assert still == pytest.approx(1.0, abs=1e-6)


def test_warp_error_cli_reports_clip_consistency(tiny_clip, tmp_path, capsys):
    source, styled = tmp_path / "in", tmp_path / "out"
    for folder, clip in ((source, frames(4, seed=2)), (styled, [frames(1, seed=3)[0]] * 4)):
        folder.mkdir()
        for i, frame in enumerate(clip):
            Image.fromarray(frame).save(folder / f"f{i:03d}.png")
    args = [str(source), str(styled), "--clip", str(tiny_clip), "--json"]
    assert warp_error.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clip_consistency"] == pytest.approx(1.0, abs=1e-6)  # a still output
    assert result["input_clip_consistency"] < 0.999
    assert result["clip_model"] == str(tiny_clip) and result["frames"] == 4
