"""Figure style and output: size, font size, resolution, embedded fonts, the colour palette.

Every figure is a plain :class:`matplotlib.figure.Figure` on an Agg canvas: pyplot is never
used, so no window opens, no global backend is switched and a notebook's own backend is
left alone. The rc settings below apply only while a figure is built and saved
(``matplotlib.rc_context``), never globally: PDF and PostScript get TrueType (Type 42)
fonts instead of Type 3 fonts, which many venues reject, and SVG keeps its text as text.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spt.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_INCHES = 50.0  # each of width and height
DPI_RANGE = (10.0, 1200.0)
MAX_FONT_POINTS = 72.0
MAX_MEGAPIXELS = 100.0  # width * height * dpi**2: a larger raster would take gigabytes to draw

# Okabe & Ito's colour-blind-safe palette without its yellow (#F0E442), which is too pale on white.
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7")
# Paired with the colours, these give every layer of a 28-layer backbone its own (colour, style).
LINESTYLES = ("-", "--", "-.", ":")

EMBED_FONTS: dict[str, Any] = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none"}


@dataclass(frozen=True)
class FigureStyle:
    """How big, how legible and how fine a figure is.

    Attributes:
        size: figure width and height in inches (None: sized to the content).
        font_size: base font size in points (None: matplotlib's default, 10); titles,
            labels and cell values are drawn relative to it.
        dpi: dots per inch of raster output (PNG); a PNG is ``size * dpi`` pixels.
    """

    size: tuple[float, float] | None = None
    font_size: float | None = None
    dpi: float = 150.0

    def __post_init__(self) -> None:
        if self.size is not None:
            if len(self.size) != 2 or any(not 0 < v <= MAX_INCHES for v in self.size):
                raise UserError("--size", f"give a width and height in (0, {MAX_INCHES:g}] inches, got {self.size}")
        if self.font_size is not None and not 0 < self.font_size <= MAX_FONT_POINTS:
            raise UserError("--font-size", f"must be in (0, {MAX_FONT_POINTS:g}] points, got {self.font_size}")
        if not DPI_RANGE[0] <= self.dpi <= DPI_RANGE[1]:
            raise UserError("--dpi", f"must be in [{DPI_RANGE[0]:g}, {DPI_RANGE[1]:g}] dots per inch, got {self.dpi}")
        if self.size is not None:
            check_pixels(self.size, self.dpi, "--size")

    def rc(self) -> dict[str, Any]:
        """The rc settings a figure is built and saved under."""
        params = dict(EMBED_FONTS)
        if self.font_size is not None:
            params["font.size"] = self.font_size
        return params

    def figsize(self, default: tuple[float, float]) -> tuple[float, float]:
        return tuple(self.size) if self.size is not None else default  # type: ignore[return-value]


@contextlib.contextmanager
def styled(style: FigureStyle) -> Iterator[None]:
    """Build (and save) a figure under ``style``'s rc settings; nothing leaks out."""
    import matplotlib

    with matplotlib.rc_context(style.rc()):
        yield


def check_pixels(size: tuple[float, float], dpi: float, field: str) -> None:
    """Refuse a figure of more than :data:`MAX_MEGAPIXELS` at ``dpi`` (before it is drawn)."""
    megapixels = size[0] * size[1] * dpi * dpi / 1e6
    if megapixels > MAX_MEGAPIXELS:
        raise UserError(field, f"a {size[0]:g} x {size[1]:g} inch figure at {dpi:g} dpi is {megapixels:,.0f} megapixels, "
                        f"more than {MAX_MEGAPIXELS:g}; give a smaller --size or --dpi")


def new_figure(style: FigureStyle, default_size: tuple[float, float]) -> Figure:
    """A constrained-layout figure on an Agg canvas (call inside :func:`styled`); one sized to
    its content that would be too large at ``style.dpi`` is refused."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_pixels(style.figsize(default_size), style.dpi, "--dpi")
    fig = Figure(figsize=style.figsize(default_size), dpi=style.dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, style: FigureStyle | None = None) -> Path:
    """Write ``fig`` to ``path`` (PNG, SVG or PDF by extension) with embedded TrueType fonts.

    Use it to save a figure again after restyling it in a notebook: ``fig.savefig``
    alone would use the session's global settings (Type 3 fonts in PDFs by default).
    """
    from spt.files import write_bytes_atomic

    style = style or FigureStyle(dpi=fig.dpi)
    path = Path(path)
    buffer = io.BytesIO()
    with styled(style):
        fig.savefig(buffer, dpi=style.dpi, format=path.suffix.lstrip(".").lower() or None)
    return write_bytes_atomic(path, buffer.getvalue())  # a full disk leaves no half-written image


def text_color(rgba: tuple[float, float, float, float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba``."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.18 else "white"
