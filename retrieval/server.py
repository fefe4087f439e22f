"""`hassod serve`: one loaded :class:`Searcher` behind a JSON API and a web page (docs/design.md §8).

Boxes are xyxy in pixels of the upright original image; outlines are polygons of ``[x, y]``
points in the same pixels (:mod:`retrieval.outlines`). Endpoints (details in ``/openapi.json``):

- ``GET /``: the page. ``GET /api/stats``: the counts of `hassod index stats`.
- ``GET /api/images``, ``GET /api/images/{id}/regions``: indexed images, an image's regions;
  ``GET /api/images/{id}?side=``: a catalog image as a JPEG, longer side at most ``side``.
- ``GET /api/regions/{id}``: a region, its ancestors (nearest first) and children;
  ``GET /api/regions/{id}/similar``: that region as the query.
- ``POST /api/regions``: an upload's regions, each with a ``handle`` valid for the latest :data:`KEPT_UPLOADS`.
- ``POST /api/search``: one of ``image``, ``image_id``, ``region`` (a handle), optional ``box``
  ("x0,y0,x1,y1"; not with ``region``; absent: whole image), ``level``, ``k``; results carry outlines.

Errors: 400 for a query that cannot be answered (``detail``: the command line's one-line
message), 404 for an unknown image, region or handle, 422 for an id out of range.
"""
from __future__ import annotations

import asyncio
import io
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image, ImageOps

from hassod.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, to_rgb
from hassod.runs import LEVEL_NAMES
from indexer.catalog import ImageRecord, RegionRecord

from .outlines import Outline, outline
from .searcher import Match, QueryError, Searcher, check_box, parse_box

# indexer.regions imports discovery and the detector, hence torch: slow to import
# (docs/benchmarks.md, "Catalog and query service").
if TYPE_CHECKING:
    from indexer.regions import Region

MAX_UPLOAD_BYTES = 100 * 2**20  # a query photo, even a 64 MP one, is far below this
KEPT_UPLOADS = 32  # uploads whose region handles stay valid; each holds (regions, dim) floats
KEPT_OUTLINES = 50_000  # region outlines kept (a few hundred bytes each); region ids are never reused

# The catalog's id columns: image ids are 32-bit, region ids 64-bit (FAISS ids). A larger
# id is refused (422) before it reaches a database that would overflow on it.
ImageId = Annotated[int, Path(ge=0, le=2**31 - 1, description="An indexed image's id.")]
RegionId = Annotated[int, Path(ge=0, le=2**63 - 1, description="An indexed region's id.")]
LevelName = Literal["whole", "part", "subpart"]


class _Lru:
    """At most ``size`` values by key; the least recently used goes first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value under ``key``; on a miss, ``make()`` is kept there."""
        if key not in self._items:
            self.put(key, make())
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def find(self, key: Hashable) -> Any | None:
        if key in self._items:
            self._items.move_to_end(key)
        return self._items.get(key)


@dataclass(frozen=True)
class _Upload:
    """An uploaded image's regions and their descriptors (rows in the index's space)."""

    width: int
    height: int
    regions: list[Region]
    vectors: np.ndarray


class _Uploads:
    """Uploaded images' regions by handle, "<upload token>.<region index>"; the oldest upload
    is forgotten first, so memory stays bounded however many images are uploaded."""

    def __init__(self, size: int):
        self._uploads = _Lru(size)

    def add(self, upload: _Upload) -> str:
        token = secrets.token_hex(8)
        self._uploads.put(token, upload)
        return token

    def find(self, handle: str) -> tuple[_Upload, int]:
        token, _, index = handle.partition(".")
        upload = self._uploads.find(token)
        if upload is None or not index.isdigit() or int(index) >= len(upload.regions):
            raise HTTPException(status_code=404, detail=f"no region {handle!r}: region handles last for the "
                                                        f"latest {self._uploads.size} uploads; upload the image again")
        return upload, int(index)


def create_app(searcher: Searcher, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> FastAPI:
    """The web application over an open :class:`Searcher` (closed when the app shuts down).

    An uploaded query image over ``max_upload_bytes`` is refused (413) unread;
    one over ``max_pixels`` pixels (or an indexed one) is refused (400) before decoding.
    """
    # Every call that touches the backbone, catalog or FAISS index runs on this one thread, after
    # Searcher.refresh (so the next request sees a later `hassod index build` into the directory):
    # the SQLite connection and the torch model stay on the thread that made them, and queries do
    # not compete for the cores.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hassod-search")
    # Both only touched on the worker thread.
    outlines = _Lru(KEPT_OUTLINES)
    uploads = _Uploads(KEPT_UPLOADS)

    def refreshed(fn: Callable[[], Any]) -> Any:
        searcher.refresh()
        return fn()

    async def on_worker(fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wrap_future(worker.submit(refreshed, fn))
        except (QueryError, ImageError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    async def read_upload(image: UploadFile) -> bytes:
        data = await image.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(status_code=413, detail=f"image file over the limit of {max_upload_bytes:,} bytes")
        return data

    def described(records: list[RegionRecord]) -> list[dict[str, Any]]:
        return [_region_json(r, outlines.get(r.id, lambda r=r: outline(r.mask_rle, r.box))) for r in records]

    def results(matches: list[Match]) -> list[dict[str, Any]]:
        """The matches as JSON, each with its region's outline (empty if a build removed it since)."""
        shapes = {d["id"]: d["outline"] for d in described(searcher.catalog.regions([m.region_id for m in matches]))}
        return [r | {"outline": shapes.get(r["region_id"], [])} for r in _results(searcher, matches)]

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
        image: UploadFile | None = File(None, description="The query image (or give image_id or region)."),
        image_id: int | None = Form(None, ge=0, le=2**31 - 1, description="An indexed image as the query."),
        region: str | None = Form(None, description="A region handle from POST /api/regions as the query."),
        box: str | None = Form(None, description="x0,y0,x1,y1 in query-image pixels; absent: the whole image."),
        level: str | None = Form(None, description="Only match regions of this level: whole, part or subpart."),
        k: int = Form(10, ge=1, le=1000, description="Number of images."),
    ) -> dict[str, Any]:
        if sum(q is not None for q in (image, image_id, region)) != 1:
            raise HTTPException(status_code=400, detail="give one of image (a file), image_id (an indexed image) "
                                                        "or region (a handle from POST /api/regions)")
        if region is not None and box:
            raise HTTPException(status_code=400, detail="box goes with image or image_id: a region is its own query")
        data = None if image is None else await read_upload(image)

        def by_handle() -> dict[str, Any]:
            start = time.perf_counter()
            upload, index = uploads.find(region)
            matches = searcher.search_vector(upload.vectors[index], level=level or None, k=k)
            return {"query": {"width": upload.width, "height": upload.height, "box": list(upload.regions[index].box),
                              "region": region}, "results": results(matches), "seconds": time.perf_counter() - start}

        def by_image() -> dict[str, Any]:
            start = time.perf_counter()
            source = io.BytesIO(data) if data is not None else _indexed_path(searcher, image_id)
            pixels = load_rgb(source, max_pixels)
            crop = None if not box else tuple(float(v) for v in check_box(parse_box(box), pixels.shape[:2]))
            matches = searcher.search(pixels, box=crop, level=level or None, k=k)
            height, width = pixels.shape[:2]
            return {"query": {"width": width, "height": height, "box": crop},
                    "results": results(matches), "seconds": time.perf_counter() - start}

        return await on_worker(by_handle if region is not None else by_image)

    @app.post("/api/regions")
    async def upload_regions(image: UploadFile = File(description="The image whose regions to find.")
                             ) -> dict[str, Any]:
        """The uploaded image's regions, found as the index finds regions, each with a handle for POST /api/search."""
        data = await read_upload(image)

        def run() -> dict[str, Any]:
            start = time.perf_counter()
            pixels = load_rgb(io.BytesIO(data), max_pixels)
            found, vectors = searcher.query_regions(pixels)
            height, width = pixels.shape[:2]
            token = uploads.add(_Upload(width, height, found, vectors))
            return {"width": width, "height": height, "regions": [_upload_json(r, i, token) for i, r in enumerate(found)],
                    "seconds": time.perf_counter() - start}

        return await on_worker(run)

    @app.get("/api/regions/{region_id}")
    async def region_tree(region_id: RegionId) -> dict[str, Any]:
        """An indexed region with its chain of ancestors (nearest first) and its children."""
        def run() -> dict[str, Any]:
            found = searcher.catalog.regions([region_id])
            if not found:
                raise HTTPException(status_code=404, detail=f"no region {region_id} in this index")
            return {"region": described(found)[0], "ancestors": described(searcher.catalog.ancestors(region_id)),
                    "children": described(searcher.catalog.children(region_id))}

        return await on_worker(run)

    @app.get("/api/regions/{region_id}/similar")
    async def similar(region_id: RegionId, k: int = Query(10, ge=1, le=1000),
                      level: str | None = None) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            start = time.perf_counter()
            matches = searcher.search_region(region_id, level=level, k=k)
            return {"results": results(matches), "seconds": time.perf_counter() - start}

        return await on_worker(run)

    @app.get("/api/images")
    async def images(offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=1000),
                     level: LevelName | None = Query(None, description="Only images holding regions of this level.")
                     ) -> dict[str, Any]:
        """The indexed images, ordered by path, ``limit`` of them after the first ``offset``."""
        def run() -> dict[str, Any]:
            total, page = searcher.catalog.indexed_images(offset, limit, _level_number(level))
            return {"total": total, "images": [_image_json(i) | {"regions": i.n_regions} for i in page]}

        return await on_worker(run)

    @app.get("/api/images/{image_id}/regions")
    async def image_regions(image_id: ImageId, level: LevelName | None = Query(None, description="Only this level.")
                            ) -> dict[str, Any]:
        """An indexed image's regions with their outlines, by id."""
        def run() -> dict[str, Any]:
            found = _indexed_image(searcher, image_id)
            if found is None:
                raise HTTPException(status_code=404, detail=f"no image {image_id} in this index")
            return {"image": _image_json(found),
                    "regions": described(searcher.catalog.regions_of_image(image_id, _level_number(level)))}

        return await on_worker(run)

    @app.get("/api/images/{image_id}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    async def picture(image_id: ImageId, side: int = Query(640, ge=16, le=4096)) -> Response:
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
            return {**searcher.index.stats(), "backbone": searcher.config.backbone,
                    "descriptor": searcher.config.descriptor}

        return await on_worker(run)

    return app


def _level_number(level: str | None) -> int | None:
    return None if level is None else LEVEL_NAMES.index(level)


def _image_json(image: ImageRecord) -> dict[str, Any]:
    return {"id": image.id, "path": image.path, "width": image.width, "height": image.height}


def _region_json(region: RegionRecord, shape: Outline) -> dict[str, Any]:
    return {"id": region.id, "image_id": region.image_id, "box": list(region.box), "level": LEVEL_NAMES[region.level],
            "parent_id": region.parent_id, "score": region.score, "area": region.area, "outline": shape}


def _upload_json(region: Region, index: int, token: str) -> dict[str, Any]:
    return {"handle": f"{token}.{index}", "parent": None if region.parent < 0 else f"{token}.{region.parent}",
            "box": list(region.box), "level": LEVEL_NAMES[region.level], "score": region.score, "area": region.area,
            "outline": outline(region.mask_rle, region.box)}


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
        # The pixels the index saw: 16-bit scaled, transparency on white (a plain convert clips or blackens them).
        picture = Image.fromarray(to_rgb(ImageOps.exif_transpose(picture)))
        picture.thumbnail((side, side))
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=85)
        return out.getvalue()
