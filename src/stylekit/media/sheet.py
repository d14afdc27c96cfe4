"""Contact sheets: a grid of images with the values that made them written along the edges.

Columns take the first varied setting, rows the second; each label is drawn with PIL's default
font (FreeType where Pillow has it) at a size that scales with the cells, so the values stay
readable at a glance whatever the image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, EMPTY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
PAD = 4  # px between cells and around the labels


def font_size(cell: tuple[int, int]) -> int:
    """Label text height for cells of (W, H): a 16th of the narrower side, 12 to 48 px."""
    return max(12, min(48, min(cell) // 16))


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int) -> tuple[int, int]:
    """(W, H) of `text` drawn at `size`."""
    left, top, right, bottom = font(size).getbbox(text)
    return right - left, bottom - top


def label(text: str, box: tuple[int, int], size: int) -> Image.Image:
    """`text` centred in a white (W, H) box: how every label of a sheet is drawn."""
    image = Image.new("RGB", box, BACKGROUND)
    left, top, right, bottom = font(size).getbbox(text)
    x = (box[0] - (right - left)) // 2 - left
    y = (box[1] - (bottom - top)) // 2 - top
    ImageDraw.Draw(image).text((x, y), text, fill=INK, font=font(size))
    return image


@dataclass(frozen=True)
class Layout:
    """Where everything goes on a sheet of `rows` x `cols` cells of `cell` (W, H) px, under a
    `title` band (0 when there is none) and a band of column labels, right of the row labels."""

    cell: tuple[int, int]
    cols: int
    rows: int
    label_w: int  # width of the row-label column (0: no row labels)
    label_h: int  # height of the column-label band and of the title band
    titled: bool = False
    col_w: int = 0  # a column's width: the cell's, or its label's where that is wider

    @property
    def pitch(self) -> int:
        return max(self.col_w, self.cell[0])

    @property
    def top(self) -> int:
        return self.label_h * (2 if self.titled else 1)

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.cell
        return (
            self.label_w + self.cols * (self.pitch + PAD) + PAD,
            self.top + self.rows * (h + PAD) + PAD,
        )

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The cell's (left, top, right, bottom)."""
        w, h = self.cell
        x = self.label_w + PAD + col * (self.pitch + PAD) + (self.pitch - w) // 2
        y = self.top + PAD + row * (h + PAD)
        return x, y, x + w, y + h

    def col_label(self, col: int) -> tuple[int, int, int, int]:
        x0 = self.label_w + PAD + col * (self.pitch + PAD)
        return x0, self.top - self.label_h, x0 + self.pitch, self.top

    def row_label(self, row: int) -> tuple[int, int, int, int]:
        _, y0, _, y1 = self.box(row, 0)
        return 0, y0, self.label_w, y1

    def title(self) -> tuple[int, int, int, int]:
        return 0, 0, self.size[0], self.label_h


def layout(
    cell: tuple[int, int], cols: Sequence[str], rows: Sequence[str], title: str | None = None
) -> Layout:
    """The layout for these labels (an empty `rows` label list: one unlabelled row)."""
    size = font_size(cell)
    label_h = size + 2 * PAD + size // 2
    widest = max((text_size(t, size)[0] for t in rows), default=0)
    label_w = widest + 4 * PAD if rows else 0
    col_w = max((text_size(t, size)[0] for t in cols), default=0) + 2 * PAD
    titled = title is not None
    return Layout(cell, len(cols), max(len(rows), 1), label_w, label_h, titled, col_w)


def contact_sheet(
    cells: Sequence[Sequence[Image.Image | None]],
    cols: Sequence[str],
    rows: Sequence[str],
    *,
    title: str | None = None,
) -> tuple[Image.Image, Layout]:
    """Draw `cells[row][col]` (None: a grey box, the cell failed) under their labels.

    Cells take the size of the largest image; a smaller one is centred in its box."""
    images = [im for row in cells for im in row if im is not None]
    cell = (
        max((im.width for im in images), default=64),
        max((im.height for im in images), default=64),
    )
    plan = layout(cell, cols, rows, title)
    sheet = Image.new("RGB", plan.size, BACKGROUND)
    size = font_size(cell)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            x0, y0, x1, y1 = plan.box(r, c)
            if image is None:
                sheet.paste(Image.new("RGB", cell, EMPTY), (x0, y0))
                continue
            dx, dy = (cell[0] - image.width) // 2, (cell[1] - image.height) // 2
            sheet.paste(image.convert("RGB"), (x0 + dx, y0 + dy))
    for c, text in enumerate(cols):
        put(sheet, label(text, box_size(plan.col_label(c)), size), plan.col_label(c))
    for r, text in enumerate(rows):
        put(sheet, label(text, box_size(plan.row_label(r)), size), plan.row_label(r))
    if title is not None:
        put(sheet, label(title, box_size(plan.title()), size), plan.title())
    return sheet, plan


def box_size(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return box[2] - box[0], box[3] - box[1]


def put(sheet: Image.Image, image: Image.Image, box: tuple[int, int, int, int]) -> None:
    sheet.paste(image, box[:2])
