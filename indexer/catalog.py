"""The index catalog: images, their regions and the index configuration.

One SQLAlchemy database per index (a SQLite file inside the index directory by
default, any SQLAlchemy URL otherwise, PostgreSQL included). Region ids are
the FAISS ids of the region descriptors, so they are never reused: images and
regions take their ids from counters stored in the catalog and advanced in
the same transaction that inserts the rows. A rolled-back transaction rolls
the counter back too, which keeps ids identical on every backend for the same
sequence of operations.

Callers only see frozen dataclasses (:class:`ImageRecord`, :class:`RegionRecord`);
sessions never leave this module. Every public method is one transaction.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Double,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.engine import Engine, Row, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hassod.errors import UserError
from hassod.runs import LEVEL_NAMES

FORMAT_VERSION = 1
"""Version of the catalog schema and config layout; bumped on incompatible changes."""

# What SQLite says of a file that is not a sound database, and what to do then: the catalog is the index's
# record of every region id, which nothing else holds.
DAMAGED_MARKS = ("file is not a database", "database disk image is malformed")
REBUILD = "build the collection into a new --index directory"

# Keeps IN (...) lists well below PostgreSQL's 65535 bind parameters per statement.
_CHUNK = 10_000

# SQLite only aliases the rowid (fast, 64-bit) for a column declared exactly INTEGER.
_Id64 = BigInteger().with_variant(Integer, "sqlite")


class CatalogUnavailableError(UserError, RuntimeError):
    """The catalog's database cannot be opened: a malformed URL, an unknown driver, or no server there."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of the collection.

    Attributes:
        path: the image's path as given to the indexer (the catalog's key).
        content_hash: sha256 hex digest of the file bytes ('' when it could not be read).
        size_bytes: file size in bytes.
        mtime: modification time, seconds since the epoch.
        width, height: image size in pixels (0 for an image in error).
        status: 'ok' or 'error'.
        error: the reason the image could not be indexed, None when status is 'ok'.
        n_regions: number of regions stored for the image.
        id: catalog id, assigned by the catalog (ignored on input).
    """

    path: str
    content_hash: str
    size_bytes: int
    mtime: float
    width: int
    height: int
    status: str = "ok"
    error: str | None = None
    n_regions: int = 0
    id: int = 0


@dataclass(frozen=True)
class NewRegion:
    """A region to store with :meth:`Catalog.replace_image`.

    Attributes:
        box: (x0, y0, x1, y1) in pixels of the original image (xyxy).
        score: confidence of the region source.
        level: 0 whole object, 1 part, 2 subpart.
        area: mask area in pixels.
        mask_rle: COCO compressed RLE dict {'size': [h, w], 'counts': bytes | str}.
        parent: index of the parent region in the same list, None for a root.
    """

    box: tuple[float, float, float, float]
    score: float
    level: int
    area: int
    mask_rle: dict[str, Any]
    parent: int | None = None


@dataclass(frozen=True)
class RegionRecord:
    """A stored region; ``id`` is also its FAISS id.

    Attributes:
        id: region id (FAISS id), never reused.
        image_id: id of the image holding the region.
        box: (x0, y0, x1, y1) in pixels of the original image (xyxy).
        score: confidence of the region source.
        level: 0 whole object, 1 part, 2 subpart.
        parent_id: region id of the parent in the same image, None for a root.
        area: mask area in pixels.
        mask_rle: COCO compressed RLE dict {'size': [h, w], 'counts': str}
            (pycocotools.mask.decode accepts it as is).
    """

    id: int
    image_id: int
    box: tuple[float, float, float, float]
    score: float
    level: int
    parent_id: int | None
    area: int
    mask_rle: dict[str, Any]


@dataclass(frozen=True)
class RegionPlace:
    """Where a region is, as a search result shows it: its image, box (xyxy pixels of the original) and level."""

    id: int
    image_id: int
    box: tuple[float, float, float, float]
    level: int


class _Base(DeclarativeBase):
    pass


class _Image(_Base):
    __tablename__ = "images"
    __table_args__ = (CheckConstraint("status IN ('ok', 'error')", name="ck_images_status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    path: Mapped[str] = mapped_column(Text, unique=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float] = mapped_column(Double)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8))
    error: Mapped[str | None] = mapped_column(Text)
    n_regions: Mapped[int] = mapped_column(Integer)


class _Region(_Base):
    __tablename__ = "regions"
    __table_args__ = (CheckConstraint("level IN (0, 1, 2)", name="ck_regions_level"),)

    id: Mapped[int] = mapped_column(_Id64, primary_key=True, autoincrement=False)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    x0: Mapped[float] = mapped_column(Double)
    y0: Mapped[float] = mapped_column(Double)
    x1: Mapped[float] = mapped_column(Double)
    y1: Mapped[float] = mapped_column(Double)
    score: Mapped[float] = mapped_column(Double)
    level: Mapped[int] = mapped_column(Integer, index=True)
    # Not a foreign key: parent and child always live and die with their image.
    parent_id: Mapped[int | None] = mapped_column(BigInteger)
    area: Mapped[int] = mapped_column(BigInteger)
    mask_rle: Mapped[str] = mapped_column(Text)


class _Config(_Base):
    __tablename__ = "config"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)  # JSON


class _Counter(_Base):
    """Last id handed out per table; ids are allocated here, never by the database."""

    __tablename__ = "id_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


_COUNTED = {"images": _Image, "regions": _Region}


class Catalog:
    """The catalog of one index.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:///index/catalog.sqlite`` or
            ``postgresql+psycopg://user@host/db`` (a bare ``postgresql://`` is
            taken to mean the psycopg 3 driver). Tables are created if missing.
    """

    def __init__(self, url: str) -> None:
        try:
            self.engine = _make_engine(url)
            _Base.metadata.create_all(self.engine)
        except (ArgumentError, NoSuchModuleError, DatabaseError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            if any(text in reason for text in DAMAGED_MARKS):
                raise CatalogUnavailableError(f"the catalog at {masked_url(url)} is damaged ({reason}); "
                                              f"{REBUILD}") from None
            raise CatalogUnavailableError(f"cannot open the catalog at {masked_url(url)}: {reason}") from None
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        with self._session.begin() as s:
            for name, table in _COUNTED.items():
                if s.get(_Counter, name) is None:
                    # A catalog from before the counter existed continues after its largest id.
                    last = s.scalar(select(func.coalesce(func.max(table.id), 0)))
                    s.add(_Counter(name=name, value=last))

    def close(self) -> None:
        """Release all database connections."""
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- configuration -------------------------------------------------------

    def get_config(self) -> dict[str, Any] | None:
        """The index configuration, or None for a catalog that has none yet."""
        with self._session() as s:
            rows = s.execute(select(_Config.key, _Config.value)).all()
        return {key: json.loads(value) for key, value in rows} or None

    def set_config(self, config: dict[str, Any]) -> None:
        """Replace the index configuration.

        Expected keys: backbone, weights, descriptor, descriptor_version,
        descriptor_dim, region_source ('discovery' or 'detector:<hash>'),
        thresholds; values must be JSON-serialisable. ``format_version`` and
        ``created_at`` (ISO 8601, UTC) are added when absent.
        """
        config = {
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **config,
        }
        rows = [{"key": k, "value": json.dumps(v, sort_keys=True)} for k, v in config.items()]
        with self._session.begin() as s:
            s.execute(delete(_Config))
            s.execute(insert(_Config), rows)

    # -- images --------------------------------------------------------------

    def image_by_path(self, path: str) -> ImageRecord | None:
        """The image stored under ``path``, or None."""
        with self._session() as s:
            row = s.scalar(select(_Image).where(_Image.path == path))
            return None if row is None else _image_record(row)

    def images(self) -> list[ImageRecord]:
        """All images, ok and in error, ordered by path."""
        with self._session() as s:
            return [_image_record(r) for r in s.scalars(select(_Image).order_by(_Image.path))]

    def indexed_images(self, offset: int = 0, limit: int = 100,
                       level: int | None = None) -> tuple[int, list[ImageRecord]]:
        """(number of indexed images, the ``limit`` of them after the first ``offset``), ordered by path.

        Images in error are left out: this is what can be shown and queried.
        With ``level``, only the images holding at least one region of that level count.
        """
        kept = [_Image.status == "ok"]
        if level is not None:
            kept.append(exists().where(_Region.image_id == _Image.id, _Region.level == level))
        with self._session() as s:
            total = s.scalar(select(func.count()).select_from(_Image).where(*kept))
            rows = s.scalars(select(_Image).where(*kept).order_by(_Image.path).offset(offset).limit(limit))
            return int(total), [_image_record(r) for r in rows]

    def images_by_id(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """Images by id (e.g. the ``image_id`` of search hits); missing ids are left out."""
        ids = sorted(set(ids))
        out: dict[int, ImageRecord] = {}
        with self._session() as s:
            for chunk in _chunks(ids):
                for row in s.scalars(select(_Image).where(_Image.id.in_(chunk))):
                    out[row.id] = _image_record(row)
        return out

    def replace_image(self, image: ImageRecord, regions: Sequence[NewRegion]) -> list[int]:
        """Store ``image`` (status 'ok') with its regions, replacing any previous entry.

        One transaction: the previous row for ``image.path`` and its regions are
        deleted, the image and the regions inserted. On any error nothing changes.
        The ids, status, error and n_regions of ``image`` are ignored.

        Returns:
            the new region ids, in the order of ``regions``. Ids of replaced
            regions are gone from the catalog; callers drop them from FAISS
            (see :meth:`region_ids` to reconcile).
        """
        return self.write_images([(replace(image, status="ok", error=None), regions)])[0]

    def write_images(self, entries: Sequence[tuple[ImageRecord, Sequence[NewRegion]]]) -> list[list[int]]:
        """Store several images with their regions in one transaction, each as :meth:`replace_image` does;
        an image whose status is 'error' is stored as unreadable, with its error and no regions.

        A build writes its images in batches through this: one commit, and one
        statement per table, for many images. On any error nothing changes.
        Returns the new region ids of each entry, in the order of its regions.
        """
        paths = [image.path for image, _ in entries]
        if len(set(paths)) != len(paths):
            raise ValueError("an image path appears twice in one batch")
        with self._session.begin() as s:
            self._delete(s, paths)
            return self._insert(s, entries)

    def record_error(self, path: str, content_hash: str, size_bytes: int, mtime: float, error: str) -> list[int]:
        """Store ``path`` as unreadable (status 'error'), replacing any previous entry.

        Returns:
            ids of the regions the previous entry had, now removed.
        """
        image = ImageRecord(path, content_hash, size_bytes, mtime, 0, 0, status="error", error=error)
        with self._session.begin() as s:
            removed = self._delete(s, [path])
            self._insert(s, [(image, [])])
        return removed

    @staticmethod
    def _insert(s: Session, entries: Sequence[tuple[ImageRecord, Sequence[NewRegion]]]) -> list[list[int]]:
        """Insert new images and their regions (their paths must be free): one statement per table."""
        for image, regions in entries:
            if image.status not in ("ok", "error") or (image.status == "error" and regions):
                raise ValueError(f"{image.path}: status must be 'ok', or 'error' without regions")
            for i, r in enumerate(regions):
                if r.parent is not None and not (0 <= r.parent < len(regions) and r.parent != i):
                    raise ValueError(f"region {i}: parent index {r.parent} is not another region of the list")
        if not entries:
            return []
        image_ids = _allocate(s, "images", len(entries))
        s.execute(insert(_Image), [
            {"id": image_id, "path": image.path, "content_hash": image.content_hash,
             "size_bytes": int(image.size_bytes), "mtime": float(image.mtime),
             "width": int(image.width) if image.status == "ok" else 0,
             "height": int(image.height) if image.status == "ok" else 0, "status": image.status,
             "error": image.error if image.status == "error" else None, "n_regions": len(regions)}
            for image_id, (image, regions) in zip(image_ids, entries)])
        ids = _allocate(s, "regions", sum(len(regions) for _, regions in entries))
        region_ids, rows = [], []
        for image_id, (_, regions) in zip(image_ids, entries):
            mine, ids = ids[: len(regions)], ids[len(regions):]
            region_ids.append(mine)
            rows += [_region_row(r, pos, image_id, mine) for pos, r in enumerate(regions)]
        if rows:
            # Core, not the ORM's bulk insert: that one splits the rows at every change of which columns are
            # NULL (roots have no parent), into many small statements.
            s.execute(insert(_Region.__table__), rows)
        return region_ids

    def delete_images(self, paths: Iterable[str]) -> list[int]:
        """Delete the images at ``paths`` (unknown paths are ignored) with their regions.

        Returns:
            the removed region ids, ascending, for the caller to drop from FAISS.
        """
        with self._session.begin() as s:
            return self._delete(s, list(paths))

    @staticmethod
    def _delete(s: Session, paths: list[str]) -> list[int]:
        removed: list[int] = []
        for chunk in _chunks(paths):
            in_chunk = select(_Image.id).where(_Image.path.in_(chunk)).scalar_subquery()
            removed += s.scalars(
                delete(_Region).where(_Region.image_id.in_(in_chunk)).returning(_Region.id),
                execution_options={"synchronize_session": False},
            ).all()
            s.execute(
                delete(_Image).where(_Image.path.in_(chunk)), execution_options={"synchronize_session": False}
            )
        return sorted(removed)

    # -- regions -------------------------------------------------------------

    def regions(self, ids: Sequence[int]) -> list[RegionRecord]:
        """The regions with these ids, in the order of ``ids``; unknown ids are left out."""
        wanted = sorted({int(i) for i in ids})
        found: dict[int, RegionRecord] = {}
        with self._session() as s:
            for chunk in _chunks(wanted):
                for row in s.scalars(select(_Region).where(_Region.id.in_(chunk))):
                    found[row.id] = _region_record(row)
        return [found[int(i)] for i in ids if int(i) in found]

    def regions_of_image(self, image_id: int, level: int | None = None) -> list[RegionRecord]:
        """The regions of one image (of one level if given), by id; empty for an unknown image."""
        query = select(_Region).where(_Region.image_id == image_id)
        if level is not None:
            query = query.where(_Region.level == level)
        with self._session() as s:
            return [_region_record(r) for r in s.scalars(query.order_by(_Region.id))]

    def children(self, region_id: int) -> list[RegionRecord]:
        """The regions whose parent is ``region_id``, by id."""
        with self._session() as s:
            rows = s.scalars(select(_Region).where(_Region.parent_id == region_id).order_by(_Region.id))
            return [_region_record(r) for r in rows]

    def ancestors(self, region_id: int) -> list[RegionRecord]:
        """The chain of parents of ``region_id``, nearest first (empty for a root or an unknown id).

        One recursive query, whatever the depth of the hierarchy.
        """
        chain = select(_Region.parent_id.label("id"), literal(1).label("depth")) \
            .where(_Region.id == region_id).cte("chain", recursive=True)
        up = select(_Region.parent_id, chain.c.depth + 1).join(chain, _Region.id == chain.c.id)
        chain = chain.union_all(up)
        query = select(_Region).join(chain, _Region.id == chain.c.id).order_by(chain.c.depth)
        with self._session() as s:
            return [_region_record(r) for r in s.scalars(query)]

    def region_places(self, ids: Sequence[int]) -> dict[int, RegionPlace]:
        """Image, box and level of the regions with these ids (unknown ids are left out).

        What a search result shows, without reading the masks: a region row's
        RLE is most of its bytes and of the time to read it.
        """
        wanted = sorted({int(i) for i in ids})
        columns = (_Region.id, _Region.image_id, _Region.x0, _Region.y0, _Region.x1, _Region.y1, _Region.level)
        found: dict[int, RegionPlace] = {}
        with self._session() as s:
            for chunk in _chunks(wanted):
                for rid, image_id, x0, y0, x1, y1, level in s.execute(select(*columns).where(_Region.id.in_(chunk))):
                    found[rid] = RegionPlace(rid, image_id, (x0, y0, x1, y1), level)
        return found

    def region_ids(self, level: int | None = None) -> np.ndarray:
        """All region ids, or those of one level, ascending: (N,) int64."""
        query = select(_Region.id).order_by(_Region.id)
        if level is not None:
            query = query.where(_Region.level == level)
        with self._session() as s:
            return np.fromiter(s.scalars(query), dtype=np.int64)

    def image_ids_of_regions(self, region_ids: Iterable[int]) -> list[int]:
        """The distinct image ids of these regions, ascending; unknown region ids are left out."""
        ids = sorted({int(i) for i in region_ids})
        owners: set[int] = set()
        with self._session() as s:
            for chunk in _chunks(ids):
                owners.update(s.scalars(select(_Region.image_id).where(_Region.id.in_(chunk)).distinct()))
        return sorted(owners)

    def region_ids_of_images(self, image_ids: Iterable[int], level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(region ids, their image ids), both (N,) int64, of the regions of
        these images (of one level if given), ordered by image id, then region id."""
        ids = sorted({int(i) for i in image_ids})
        pairs: list[Row] = []
        with self._session() as s:
            for chunk in _chunks(ids):
                query = select(_Region.image_id, _Region.id).where(_Region.image_id.in_(chunk))
                if level is not None:
                    query = query.where(_Region.level == level)
                pairs += s.execute(query.order_by(_Region.image_id, _Region.id)).all()
        owners, regions = _int_pairs(pairs).T
        return regions, owners

    def region_ids_by_image(self) -> dict[str, np.ndarray]:
        """Region ids per image path, ascending (N_i,) int64; images without regions map to empty arrays."""
        with self._session() as s:
            images = s.execute(select(_Image.id, _Image.path)).all()
            pairs = s.execute(select(_Region.image_id, _Region.id).order_by(_Region.image_id, _Region.id)).all()
        owners, ids = _int_pairs(pairs).T
        image_ids = [image_id for image_id, _ in images]
        starts = np.searchsorted(owners, image_ids, side="left")
        ends = np.searchsorted(owners, image_ids, side="right")
        return {path: ids[a:b] for (_, path), a, b in zip(images, starts, ends)}

    def stats(self) -> dict[str, Any]:
        """Counts: {'images_ok', 'images_error', 'regions', 'regions_by_level': {'whole', 'part', 'subpart'}}."""
        with self._session() as s:
            by_status = dict(s.execute(select(_Image.status, func.count()).group_by(_Image.status)).all())
            by_level = dict(s.execute(select(_Region.level, func.count()).group_by(_Region.level)).all())
        return {
            "images_ok": by_status.get("ok", 0),
            "images_error": by_status.get("error", 0),
            "regions": sum(by_level.values()),
            "regions_by_level": {name: by_level.get(i, 0) for i, name in enumerate(LEVEL_NAMES)},
        }


def masked_url(url: str) -> str:
    """``url`` without its password, to print."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed)
    engine = create_engine(parsed)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit one comes too late for
        # reads), enforce the regions -> images cascade, and use WAL so a search can
        # read while a build writes; NORMAL sync under WAL survives kill -9.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def _allocate(s: Session, name: str, n: int) -> list[int]:
    """Take the next ``n`` ids of counter ``name``; the UPDATE row-locks it until commit."""
    last = s.scalar(
        update(_Counter)
        .where(_Counter.name == name)
        .values(value=_Counter.value + n)
        .returning(_Counter.value),
        execution_options={"synchronize_session": False},
    )
    return list(range(last - n + 1, last + 1))


def _region_row(r: NewRegion, pos: int, image_id: int, ids: list[int]) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in r.box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1, r.score)):
        raise ValueError(f"region {pos}: box and score must be finite, got {r.box}, {r.score}")
    counts = r.mask_rle["counts"]
    if isinstance(counts, bytes):  # pycocotools.mask.encode gives bytes; JSON needs str
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise TypeError(f"region {pos}: mask_rle counts must be a compressed RLE (bytes or str)")
    rle = {"size": [int(v) for v in r.mask_rle["size"]], "counts": counts}
    return {
        "id": ids[pos], "image_id": image_id, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
        "score": float(r.score), "level": int(r.level),
        "parent_id": None if r.parent is None else ids[r.parent],
        "area": int(r.area), "mask_rle": json.dumps(rle),
    }


def _image_record(row: _Image) -> ImageRecord:
    return ImageRecord(
        path=row.path, content_hash=row.content_hash, size_bytes=row.size_bytes, mtime=row.mtime,
        width=row.width, height=row.height, status=row.status, error=row.error,
        n_regions=row.n_regions, id=row.id,
    )


def _region_record(row: _Region) -> RegionRecord:
    return RegionRecord(
        id=row.id, image_id=row.image_id, box=(row.x0, row.y0, row.x1, row.y1), score=row.score,
        level=row.level, parent_id=row.parent_id, area=row.area, mask_rle=json.loads(row.mask_rle),
    )


def _int_pairs(rows: Sequence[Row]) -> np.ndarray:
    """(N, 2) int64 from result rows of two integers. ``np.array`` of the rows
    themselves reads each Row through the sequence protocol, far slower
    (docs/benchmarks.md, "Catalog and query service")."""
    values = itertools.chain.from_iterable(rows)
    return np.fromiter(values, dtype=np.int64, count=2 * len(rows)).reshape(-1, 2)


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
