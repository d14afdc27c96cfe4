"""Regenerate the example images: photos shipped inside scikit-image, and a procedural style image.

    python examples/make_examples.py   (needs `pip install scikit-image`)
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent


def save_photo(name: str, array: np.ndarray, longest: int = 512) -> None:
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((longest, longest), Image.LANCZOS)
    image.save(HERE / "content" / f"{name}.jpg", quality=85, optimize=True)


def mosaic(size: int = 512, cells: int = 90, seed: int = 7) -> Image.Image:
    """A stained-glass mosaic: coloured Voronoi cells with dark leading between them."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, size, (cells, 2))
    palette = rng.choice(
        np.array([[214, 69, 65], [242, 177, 52], [56, 110, 178], [44, 160, 110], [238, 226, 200], [120, 60, 140]]),
        cells,
    )
    yy, xx = np.mgrid[0:size, 0:size]
    d = (xx[..., None] - points[:, 0]) ** 2 + (yy[..., None] - points[:, 1]) ** 2  # (H, W, cells)
    order = np.sort(d, axis=-1)
    nearest = d.argmin(-1)
    image = palette[nearest].astype(np.float32)
    edge = np.sqrt(order[..., 1]) - np.sqrt(order[..., 0]) < 3.0
    image[edge] = 25
    grain = rng.normal(0, 10, (size, size, 1))
    out = Image.fromarray(np.clip(image + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    draw.rectangle([0, 0, size - 1, size - 1], outline=(25, 25, 25), width=6)
    return out.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    from skimage import data

    (HERE / "content").mkdir(exist_ok=True)
    (HERE / "style").mkdir(exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea"):
        save_photo(name, getattr(data, name)())
    mosaic().save(HERE / "style" / "mosaic.jpg", quality=88, optimize=True)
