"""`hassod search` and `hassod serve`: over :class:`retrieval.searcher.Searcher` and :mod:`retrieval.server`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .console import Command, fail
from .options import LEVEL_CHOICES, device_option, index_option, json_option, max_pixels_option, options


def _parse_box(value: str | None) -> tuple[float, ...] | None:
    from retrieval.searcher import QueryError, parse_box

    try:
        return None if value is None else parse_box(value)
    except QueryError as exc:
        raise click.BadParameter(str(exc)) from None


def _open_searcher(
    index_dir: Path, device: str, weights: str | None, detector: str | None, load_backbone: bool = True
):
    """The index's Searcher. Without ``load_backbone`` (region-id queries) torch is not even imported."""
    from hassod.device import resolve_device
    from indexer.index import Index
    from retrieval.searcher import Searcher

    if load_backbone or device != "auto":  # "auto" is always there; checking it would import torch
        resolve_device(device)  # a device that is not there is the first thing to say
    return Searcher(Index.open(index_dir), device=None if device == "auto" else device, weights=weights, detector=detector,
                    load_backbone=load_backbone)


# The options with which search and serve open an index and read query images.
searcher_options = options(
    click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Backbone weights, as at build."),
    click.option("--detector", type=click.Path(exists=True, dir_okay=False),
                 help="The index's detector checkpoint, if moved since the build (whole-image queries)."),
    device_option(help=None),
    max_pixels_option("Refuse query images larger than this."),
)


@click.command(cls=Command)
@index_option()
@click.option("--query", type=click.Path(path_type=Path), help="Query image.")
@click.option("--box", help="x0,y0,x1,y1 in query-image pixels; without it the whole image is the query.")
@click.option("--region", "region_id", type=int, help="Query by an indexed region id instead of an image.")
@click.option("--level", type=click.Choice(LEVEL_CHOICES), help="Only match regions of this level.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@searcher_options
@json_option("Print results as JSON lines.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a results page.")
def search(index_dir, query, box, region_id, level, k, weights, detector, device, max_pixels, as_json, html_out):
    """Find the images of the index that contain the query region, best first, with the matched box."""
    from retrieval.html import write_results_page
    from retrieval.searcher import check_box, load_query

    if (query is None) == (region_id is None):
        fail("give either --query IMAGE (optionally with --box) or --region ID")
    if region_id is not None and box is not None:
        fail("--box goes with --query: a --region query is that whole region")
    searcher = _open_searcher(index_dir, device, weights, detector, load_backbone=region_id is None)
    try:
        if region_id is not None:
            matches = searcher.search_region(region_id, level=level, k=k)
            if html_out is not None:  # the page shows the query region in its own image
                place = searcher.catalog.region_places([region_id])[region_id]
                image = searcher.catalog.images_by_id([place.image_id])[place.image_id]
                pixels, crop_box = load_query(image.path, max_pixels), place.box
        else:
            pixels = load_query(query, max_pixels)
            crop_box = None if box is None else tuple(check_box(_parse_box(box), pixels.shape[:2]))
            matches = searcher.search(pixels, box=crop_box, level=level, k=k)
    finally:
        searcher.close()
    if not matches and not as_json:
        click.echo("no results: " + ("the index holds no regions" if not len(searcher.store)
                                     else f"the index holds no {level} regions" if level else "no match"))
    for rank, match in enumerate(matches, start=1):
        if as_json:
            click.echo(json.dumps({"rank": rank, "path": match.path, "score": round(match.score, 5),
                                   "box": [round(v, 1) for v in match.box], "level": match.level_name,
                                   "region_id": match.region_id}))
        else:
            x0, y0, x1, y1 = match.box
            click.echo(f"{rank:3d}  {match.score:.3f}  {match.level_name:8s} "
                       f"[{x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}]  {match.path}")
    if html_out is not None:
        title = f"hassod search: {query}" if region_id is None else f"hassod search: region {region_id}"
        write_results_page(html_out, pixels, crop_box, matches, title=title)
        if not as_json:
            click.echo(f"results page: {html_out}")


@click.command(cls=Command)
@index_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@searcher_options
def serve(index_dir, host, port, weights, detector, device, max_pixels):
    """Serve the index: a web page that outlines every image's regions and searches by any of them (or a
    drawn box), and the HTTP API behind it."""
    import socket

    import uvicorn

    from retrieval.server import create_app

    searcher = _open_searcher(index_dir, device, weights, detector)
    # Bound here, not by uvicorn, so that a busy port is a one-line error.
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(128)  # connections wait in the backlog until the app has started
    except OSError as exc:
        searcher.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    bound_port = listener.getsockname()[1]
    click.echo(f"serving {index_dir} on http://{host}:{bound_port}/ (Ctrl+C to stop)")
    server = uvicorn.Server(uvicorn.Config(create_app(searcher, max_pixels=max_pixels), log_level="warning"))
    server.run(sockets=[listener])

