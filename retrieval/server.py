"""`hassod serve`: the searcher behind an HTTP API and a web page where a user draws the query box.

Endpoints (JSON unless noted; boxes are xyxy pixels of the upright original image):

- ``GET /``: the web page (upload an image, drag a box, see where it appears).
- ``POST /api/search``: multipart form ``image`` (file) or ``image_id`` (an indexed
  image), ``box`` ("x0,y0,x1,y1"; absent: the whole image), ``level`` (whole | part |
  subpart), ``k``.
- ``GET /api/images?offset=&limit=``: the indexed images (id, path, size, regions), by path.
- ``GET /api/regions/{region_id}/similar?k=&level=``: an indexed region as the query.
- ``GET /api/images/{image_id}?side=``: an indexed image as a JPEG whose longer side is at
  most ``side`` pixels (only images of the catalog are served).
- ``GET /api/stats``: the counts of `hassod index stats`.

A query that cannot be answered is a 400 whose ``detail`` is the one-line
message of the command line. The backbone, catalog and FAISS index are loaded
once; every call that touches them runs on one dedicated thread (the SQLite
connection and the torch model stay on the thread that made them, and queries
do not compete for the cores), after :meth:`Searcher.refresh`, so that a later
`hassod index build` into the same directory is seen by the next request.
"""
from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Callable

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image, ImageOps

from hassod.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from indexer.catalog import ImageRecord

from .searcher import Match, QueryError, Searcher, check_box, parse_box

MAX_UPLOAD_BYTES = 100 * 2**20  # a query photo, even a 64 MP one, is far below this


def create_app(searcher: Searcher, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> FastAPI:
    """The web application over an open :class:`Searcher` (closed when the app shuts down).

    An uploaded query image over ``max_upload_bytes`` is refused (413) unread;
    one over ``max_pixels`` pixels (or an indexed one) is refused (400) before decoding.
    """
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hassod-search")

    def refreshed(fn: Callable[[], Any]) -> Any:
        searcher.refresh()
        return fn()

    async def on_worker(fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wrap_future(worker.submit(refreshed, fn))
        except (QueryError, ImageError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.submit(searcher.close).result()
        worker.shutdown()

    app = FastAPI(title="hassod search", summary="Where does this object, or this part, appear?", lifespan=lifespan)
    page = resources.files("retrieval").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return page

    @app.post("/api/search")
    async def search(
        image: UploadFile | None = File(None, description="The query image (or give image_id)."),
        image_id: int | None = Form(None, description="An indexed image as the query (instead of a file)."),
        box: str | None = Form(None, description="x0,y0,x1,y1 in query-image pixels; absent: the whole image."),
        level: str | None = Form(None, description="Only match regions of this level: whole, part or subpart."),
        k: int = Form(10, ge=1, le=1000, description="Number of images."),
    ) -> dict[str, Any]:
        if (image is None) == (image_id is None):
            raise HTTPException(status_code=400, detail="give either image (a file) or image_id (an indexed image)")
        data = None if image is None else await image.read(max_upload_bytes + 1)
        if data is not None and len(data) > max_upload_bytes:
            raise HTTPException(status_code=413, detail=f"image file over the limit of {max_upload_bytes:,} bytes")

        def run() -> dict[str, Any]:
            start = time.perf_counter()
            source = io.BytesIO(data) if data is not None else _indexed_path(searcher, image_id)
            pixels = load_rgb(source, max_pixels)
            crop = None if not box else tuple(float(v) for v in check_box(parse_box(box), pixels.shape[:2]))
            matches = searcher.search(pixels, box=crop, level=level or None, k=k)
            height, width = pixels.shape[:2]
            return {"query": {"width": width, "height": height, "box": crop},
                    "results": _results(searcher, matches), "seconds": time.perf_counter() - start}

        return await on_worker(run)

    @app.get("/api/regions/{region_id}/similar")
    async def similar(region_id: int, k: int = Query(10, ge=1, le=1000), level: str | None = None) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            start = time.perf_counter()
            matches = searcher.search_region(region_id, level=level, k=k)
            return {"results": _results(searcher, matches), "seconds": time.perf_counter() - start}

        return await on_worker(run)

    @app.get("/api/images")
    async def images(offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=1000)) -> dict[str, Any]:
        """The indexed images, ordered by path, ``limit`` of them after the first ``offset``."""
        def run() -> dict[str, Any]:
            total, page = searcher.catalog.indexed_images(offset, limit)
            return {"total": total, "images": [{"id": i.id, "path": i.path, "width": i.width, "height": i.height,
                                                "regions": i.n_regions} for i in page]}

        return await on_worker(run)

    @app.get("/api/images/{image_id}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    async def picture(image_id: int, side: int = Query(640, ge=16, le=4096)) -> Response:
        found = await on_worker(lambda: _indexed_image(searcher, image_id))
        if found is None:
            raise HTTPException(status_code=404, detail=f"no image {image_id} in this index")
        try:
            jpeg = await asyncio.to_thread(_jpeg_thumbnail, found.path, side, max_pixels)
        except (OSError, ImageError) as exc:
            raise HTTPException(status_code=404, detail=f"image {image_id} cannot be read: {exc}") from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/stats")
    async def stats() -> dict[str, Any]:
        def run() -> dict[str, Any]:
            return {**searcher.catalog.stats(), "vectors": searcher.store.info(),
                    "backbone": searcher.config["backbone"], "descriptor": searcher.config["descriptor"]}

        return await on_worker(run)

    return app


def _indexed_image(searcher: Searcher, image_id: int) -> ImageRecord | None:
    """The catalog record of an image the index holds regions of (not one in error), else None."""
    found = searcher.catalog.images_by_id([image_id]).get(image_id)
    return found if found is not None and found.status == "ok" else None


def _indexed_path(searcher: Searcher, image_id: int) -> str:
    found = _indexed_image(searcher, image_id)
    if found is None:
        raise QueryError(f"no image {image_id} in this index")
    return found.path


def _results(searcher: Searcher, matches: list[Match]) -> list[dict[str, Any]]:
    images = searcher.catalog.images_by_id(m.image_id for m in matches)
    return [
        {"rank": rank, "image_id": m.image_id, "region_id": m.region_id, "path": m.path, "score": m.score,
         "box": list(m.box), "level": m.level_name,
         "width": images[m.image_id].width, "height": images[m.image_id].height}
        for rank, m in enumerate(matches, start=1)
    ]


def _jpeg_thumbnail(path: str, side: int, max_pixels: int) -> bytes:
    """The image at ``path``, upright, its longer side at most ``side`` pixels, as JPEG bytes."""
    with Image.open(path) as picture:
        if picture.width * picture.height > max_pixels:
            raise ImageError("image too large to show")
        picture.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, far faster than full size
        picture = ImageOps.exif_transpose(picture).convert("RGB")
        picture.thumbnail((side, side))
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=85)
        return out.getvalue()
