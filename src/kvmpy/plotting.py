"""Writing matplotlib figures (the Agg backend; no display, no pyplot global state)."""

from __future__ import annotations

from pathlib import Path

from .errors import KvmpyError


def save_figure(
    fig, path: str | Path, dpi: int = 120, error: type[KvmpyError] = KvmpyError
) -> Path:
    """Write `fig` in the format its suffix names (.png, .svg, .pdf). A write error becomes one
    clear `error`, not a traceback after minutes of measuring."""
    path = Path(path)
    try:
        fig.savefig(path, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    except OSError as e:
        raise error(f"cannot write the plot to {path}: {e.strerror or e}") from None
    return path
