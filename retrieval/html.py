"""A self-contained HTML page of a search: the query crop and the results with their boxes drawn."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from hassod.images import ImageError, load_rgb
from hassod.runs import atomic_write

from .searcher import Match

THUMB_SIDE = 320
LEVEL_COLOURS = ("#e63232", "#28c83c", "#326ef0")  # whole, part, subpart: as in the discovery overlays


def _thumbnail(image: np.ndarray, box: Sequence[float] | None, colour: str) -> str:
    """A JPEG data URI of ``image`` scaled to THUMB_SIDE, with ``box`` (xyxy pixels) outlined."""
    picture = Image.fromarray(image)
    scale = THUMB_SIDE / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    if box is not None:
        x0, y0, x1, y1 = (v * scale for v in box)
        ImageDraw.Draw(picture).rectangle([x0, y0, x1, y1], outline=colour, width=3)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_results_page(out: Path, query: np.ndarray, box: Sequence[float] | None, matches: list[Match],
                       title: str = "hassod search") -> Path:
    """Write the page to ``out``; unreadable result images are listed without a picture."""
    cards = []
    for rank, match in enumerate(matches, start=1):
        colour = LEVEL_COLOURS[match.level]
        try:
            picture = f'<img src="{_thumbnail(load_rgb(match.path), match.box, colour)}">'
        except (ImageError, FileNotFoundError) as exc:
            picture = f"<p>(cannot show: {html.escape(str(exc))})</p>"
        cards.append(
            f'<figure>{picture}<figcaption>#{rank} {html.escape(Path(match.path).name)}<br>'
            f'score {match.score:.3f} · <span style="color:{colour}">{match.level_name}</span> · '
            f'box {", ".join(f"{v:.0f}" for v in match.box)}</figcaption></figure>'
        )
    crop = query if box is None else query[int(box[1]):int(np.ceil(box[3])), int(box[0]):int(np.ceil(box[2]))]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #fafafa; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; background: #fff; padding: 0.5em;
          box-shadow: 0 1px 3px #0003; }}
figcaption {{ font-size: 0.85em; max-width: {THUMB_SIDE}px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Query</h2>
<figure><img src="{_thumbnail(query, box, '#ffb000')}"><figcaption>query image</figcaption></figure>
<figure><img src="{_thumbnail(np.ascontiguousarray(crop), None, '')}"><figcaption>searched region</figcaption></figure>
<h2>{len(matches)} results</h2>
{''.join(cards) or '<p>No results.</p>'}
</body></html>
"""
    out = Path(out)
    with atomic_write(out) as handle:
        handle.write(page)
    return out
