"""An index: one directory, its configuration, catalog, vectors and whitening (docs/design.md §8).

``DIR/vectors.faiss``       FAISS vectors keyed by region id (indexer.vectors)
``DIR/vectors.*.ivfdata``   memory-mapped inverted lists of an ``ondisk`` index
``DIR/shards/``             shard indexes of a Ray build, not merged yet (indexer.distributed)
``DIR/catalog.sqlite``      the catalog, unless ``--db URL`` put it elsewhere
``DIR/index.json``          ``{"catalog": URL, "index_id": ID}`` when the catalog lives elsewhere
``DIR/whitening.npz``       the PCA-whitening of the vectors, when built with one (indexer.whitening)
``DIR/build.lock``          locked (flock) while a build writes the index

:class:`IndexConfig` is what the first build records in the catalog: what a
query must match to be comparable with the stored vectors, and how a
whole-image query finds its regions. :class:`Index` is the only reader of
that record; builds, the searcher, the server and ``index stats`` take one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hassod.errors import UserError
from hassod.locks import exclusive
from hassod.runs import LEVEL_NAMES, atomic_write

from .catalog import FORMAT_VERSION, Catalog, masked_url
from .vectors import VectorFileError, VectorStore
from .whitening import PCAWhitening, WhiteningSettings

if TYPE_CHECKING:  # the descriptors import torch: a query by region id does without it
    from hassod.discover.recipes import RegionRecipe
    from hassod.features import Backbone

    from .descriptors import RegionDescriber
    from .regions import RegionSource

VECTORS_FILE = "vectors.faiss"
CATALOG_FILE = "catalog.sqlite"
POINTER_FILE = "index.json"
WHITENING_FILE = "whitening.npz"
LOCK_FILE = "build.lock"
SHARDS_DIR = "shards"

log = logging.getLogger(__name__)

# Reads of the vectors file, at most, when builds keep replacing it during the read.
_LOAD_TRIES = 3

# What a query's descriptors must share with the index's to be comparable with them.
_COMPARABLE = ("backbone", "weights", "descriptor", "descriptor_version", "descriptor_dim", "whitening")


class IndexNotFoundError(UserError, FileNotFoundError):
    """No index at the given directory."""


class IncompatibleIndexError(UserError, RuntimeError):
    """The index was built with another backbone, weights, descriptor or whitening than requested."""


class IncompatibleSourceError(UserError, RuntimeError):
    """The index was built from another region source or recipe."""


@dataclass(frozen=True)
class IndexConfig:
    """What an index was built with; every field is stored in the catalog under its own name.

    Attributes:
        backbone, weights: the backbone's name and weights id (hash of an explicit weights file).
        descriptor: :attr:`RegionDescriber.name`; ``descriptor_version``, ``descriptor_dim`` and
            ``descriptor_settings`` (a :class:`~indexer.descriptors.DescriptorSettings` as a dict) with it.
        region_source: :attr:`RegionSource.identity` of the regions indexed.
        recipe: the discovery recipe (``paper``, ``search``); ``paper`` for discovery indexes from before
            recipes were recorded; None for regions from a detector or a COCO file.
        query_regions: how a whole-image query finds its regions (:func:`indexer.regions.query_regions`).
        whitening: the PCA-whitening of the stored vectors (``dim`` resolved), None without one.
        index_id: ties a catalog living in another database to its directory (:meth:`Index.claim`).
    """

    backbone: str
    weights: str | None
    descriptor: str
    descriptor_version: int
    descriptor_dim: int
    descriptor_settings: Mapping[str, Any]
    region_source: str
    recipe: str | None
    query_regions: Mapping[str, Any] | None
    whitening: WhiteningSettings | None = None
    index_id: str | None = None
    format_version: int = FORMAT_VERSION
    created_at: str | None = None

    @classmethod
    def of_build(cls, describer: RegionDescriber, source: RegionSource,
                 whitening: WhiteningSettings | None = None) -> IndexConfig:
        """The configuration a build with these parts records."""
        if whitening is not None:
            whitening = WhiteningSettings(dim=whitening.dim or describer.dim, shrinkage=whitening.shrinkage)
        return cls(backbone=describer.backbone.name, weights=describer.backbone.weights_id,
                   descriptor=describer.name, descriptor_version=describer.settings.version,
                   descriptor_dim=describer.dim, descriptor_settings=_as_json(dataclasses.asdict(describer.settings)),
                   region_source=source.identity, recipe=source.recipe, query_regions=_as_json(source.query_settings),
                   whitening=whitening)

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> IndexConfig:
        """The configuration as the catalog stores it (:meth:`to_dict`), older layouts included."""
        whitening = stored.get("whitening")
        recipe = stored.get("recipe")
        if "recipe" not in stored and str(stored.get("region_source", "")).startswith("discovery:"):
            recipe = "paper"  # discovery indexes from before recipes were recorded
        return cls(backbone=stored["backbone"], weights=stored.get("weights"), descriptor=stored["descriptor"],
                   descriptor_version=stored.get("descriptor_version", 1), descriptor_dim=stored["descriptor_dim"],
                   descriptor_settings=stored.get("descriptor_settings") or {},
                   region_source=stored.get("region_source", ""), recipe=recipe,
                   query_regions=stored.get("query_regions"),
                   whitening=WhiteningSettings(dim=whitening["dim"], shrinkage=whitening["shrinkage"])
                   if whitening else None,
                   index_id=stored.get("index_id"), format_version=stored.get("format_version"),
                   created_at=stored.get("created_at"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``index_id`` and ``created_at`` only when set."""
        stored = dataclasses.asdict(self)
        stored["whitening"] = None if self.whitening is None else {"dim": self.whitening.dim,
                                                                   "shrinkage": self.whitening.shrinkage}
        stored["descriptor_settings"] = dict(self.descriptor_settings)
        stored["query_regions"] = None if self.query_regions is None else dict(self.query_regions)
        return {k: v for k, v in stored.items() if v is not None or k not in ("index_id", "created_at")}

    @property
    def dim(self) -> int:
        """Length of the stored vectors: the whitening's output, else the descriptor's."""
        return self.descriptor_dim if self.whitening is None else self.whitening.dim

    def check_update(self, requested: IndexConfig) -> None:
        """Raise unless a build with ``requested`` may add to an index built with this configuration."""
        if self.format_version != FORMAT_VERSION:
            raise IncompatibleIndexError(f"index catalog has format version {self.format_version}, this hassod "
                                         f"reads version {FORMAT_VERSION}; rebuild the index")
        if requested.whitening is not None and self.whitening is None:
            raise IncompatibleIndexError("this index was built without whitening; "
                                         "build into a new --index directory to whiten")
        differing = [key for key in _COMPARABLE if getattr(self, key) != getattr(requested, key)]
        if differing:
            raise IncompatibleIndexError(
                f"index was built with {self._describe(differing)}, but {requested._describe(differing)} "
                "was requested; use the same backbone and descriptor or rebuild the index")
        if self.recipe is not None and requested.recipe is not None and self.recipe != requested.recipe:
            raise IncompatibleSourceError(
                f"this index holds regions of the {self.recipe} recipe, not {requested.recipe}; pass --recipe "
                f"{self.recipe} to update it, or build into a new --index directory")
        if self.region_source != requested.region_source:
            raise IncompatibleSourceError(
                f"this index holds regions from {self.region_source}, not {requested.region_source}; "
                "build into a new --index directory to use other regions")

    def check_backbone(self, backbone: Backbone) -> None:
        """Raise unless ``backbone`` is the one the index was built with (same name and weights)."""
        if backbone.name != self.backbone or backbone.weights_id != self.weights:
            raise IncompatibleIndexError(
                f"index was built with {self.backbone} weights {self.weights}, but {backbone.name} weights "
                f"{backbone.weights_id} were loaded; pass the same --weights file")

    def describer(self, backbone: Backbone) -> RegionDescriber:
        """The index's region describer on ``backbone`` (checked with :meth:`check_backbone`)."""
        from .descriptors import DescriptorSettings, RegionDescriber

        self.check_backbone(backbone)
        settings = dict(self.descriptor_settings)
        settings["layers"] = tuple(settings["layers"])
        describer = RegionDescriber(backbone, DescriptorSettings(**settings))
        if describer.name != self.descriptor:
            raise IncompatibleIndexError(
                f"index descriptor {self.descriptor} cannot be rebuilt here (got {describer.name})")
        return describer

    def discovery_recipe(self) -> RegionRecipe | None:
        """The discovery recipe and settings the regions were found with; None for detector or COCO regions."""
        from hassod.discover.recipes import settings_from_dict

        if self.recipe is None:
            return None
        query = {k: v for k, v in (self.query_regions or {}).items() if k != "kind"}
        return settings_from_dict({**query, "recipe": self.recipe})

    def _describe(self, keys: list[str]) -> str:
        """'backbone X / descriptor Y' for ``keys``."""
        stored = self.to_dict()
        return " / ".join(f"{key.replace('_', ' ')} {stored.get(key)}" for key in keys)


class Index:
    """The index in ``directory``, built or not; ``db_url`` puts (or finds) its catalog in that database.

    The catalog opens on first use, the vectors and the whitening load on
    first use; :meth:`open` opens an index that a build has finished, for
    search. :meth:`close` (or ``with``) releases the catalog.
    """

    def __init__(self, directory: str | os.PathLike, db_url: str | None = None):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise IndexNotFoundError(f"{self.directory} is a file, not an index directory")
        self.db_url = db_url
        self._catalog: Catalog | None = None
        self._config: IndexConfig | None = None
        self._vectors: VectorStore | None = None
        self._vectors_stamp: tuple[int, int, int] | None = None
        self._whitening: PCAWhitening | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Index:
        """A finished index with its vectors loaded, or :class:`IndexNotFoundError` saying what is missing."""
        index = cls(directory)
        try:
            index.check_built()
            index.vectors  # a damaged file is reported now
        except BaseException:
            index.close()
            raise
        return index

    def check_built(self) -> None:
        """Raise :class:`IndexNotFoundError` unless a first build has finished here."""
        if not self.exists():
            raise IndexNotFoundError(f"no index at {self.directory} "
                                     f"(build one with `hassod index build IMAGES --index {self.directory}`)")
        if self.config is None or not self.vectors_path.exists():
            raise IndexNotFoundError(f"the index at {self.directory} is empty: its first build has not finished")

    # -- layout --------------------------------------------------------------

    @property
    def vectors_path(self) -> Path:
        return self.directory / VECTORS_FILE

    @property
    def whitening_path(self) -> Path:
        return self.directory / WHITENING_FILE

    @property
    def shards_dir(self) -> Path:
        return self.directory / SHARDS_DIR

    def data_files(self) -> list[Path]:
        """The vectors file and the memory-mapped lists files beside it."""
        return [self.vectors_path] + sorted(self.directory.glob("vectors.*.ivfdata"))

    def exists(self) -> bool:
        """Whether a catalog is there: in the directory, named by its pointer file, or given as ``db_url``."""
        return bool(self.db_url) or any((self.directory / name).exists() for name in (CATALOG_FILE, POINTER_FILE))

    @property
    def catalog_url(self) -> str:
        """``db_url`` when given, else the URL the pointer file remembers, else the SQLite file inside."""
        if self.db_url:
            return self.db_url
        remembered = self._pointer()
        if remembered:
            return remembered["catalog"]
        return f"sqlite:///{(self.directory / CATALOG_FILE).resolve()}"

    def _pointer(self) -> dict[str, str]:
        """What ``index.json`` says (``{}`` without one), or :class:`IndexNotFoundError` for a damaged one."""
        pointer = self.directory / POINTER_FILE
        try:
            remembered = json.loads(pointer.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            remembered, reason = None, str(exc)
        else:
            reason = "no catalog URL in it"
        if not isinstance(remembered, dict) or not isinstance(remembered.get("catalog"), str):
            raise IndexNotFoundError(f"{pointer} is damaged ({reason}); it names the database of the catalog: "
                                     'write {"catalog": "URL"} into it')
        return remembered

    # -- contents ------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.catalog_url)
        return self._catalog

    @property
    def config(self) -> IndexConfig | None:
        """What the index was built with; None until its first build has finished."""
        if self._config is None:
            stored = self.catalog.get_config()
            try:
                self._config = None if stored is None else IndexConfig.from_dict(stored)
            except (KeyError, TypeError) as exc:
                raise IncompatibleIndexError(f"the configuration in the catalog of {self.directory} is damaged "
                                             f"({type(exc).__name__}: {exc}); build into a new --index "
                                             "directory") from None
        return self._config

    @property
    def vectors(self) -> VectorStore:
        """The saved vectors (:class:`VectorFileError` for a damaged file)."""
        if self._vectors is None:
            self._vectors = self._load_vectors()
        return self._vectors

    def _load_vectors(self) -> VectorStore:
        """The vectors file, read again when a build replaced it meanwhile: a save deletes the on-disk lists
        the old file names, so a read racing it fails without the file being damaged."""
        for attempt in range(_LOAD_TRIES):
            stamp = _stamp(self.vectors_path)  # before reading: a save in between shows as a change
            try:
                store = VectorStore.load(self.vectors_path)
                break
            except VectorFileError:
                if attempt + 1 == _LOAD_TRIES or _stamp(self.vectors_path) == stamp:
                    raise
        self._vectors_stamp = stamp
        return store

    @property
    def whitening(self) -> PCAWhitening | None:
        """The learned whitening when the configuration has one."""
        if self._whitening is None and self.config is not None and self.config.whitening is not None:
            if not self.whitening_path.exists():
                raise IndexNotFoundError(f"the index at {self.directory} is whitened but "
                                         f"{self.whitening_path.name} is missing")
            self._whitening = PCAWhitening.load(self.whitening_path)
        return self._whitening

    def learned_whitening(self) -> PCAWhitening | None:
        """The whitening file a (maybe unfinished) first build saved, whatever the configuration says."""
        return PCAWhitening.load(self.whitening_path) if self.whitening_path.exists() else None

    def refresh_vectors(self) -> bool:
        """Reload the vectors if a build has replaced the file since they were loaded; True when it did.

        Every save swaps the file atomically, so one ``stat`` tells. A damaged
        new file is logged and skipped: what is loaded keeps answering.
        """
        stamp = _stamp(self.vectors_path)
        if stamp is None or stamp == self._vectors_stamp:  # unchanged, or removed: keep what is loaded
            return False
        try:
            self._vectors = self._load_vectors()
        except VectorFileError as exc:
            self._vectors_stamp = stamp  # not again until a build replaces it
            log.warning("%s; still answering from the vectors loaded before", exc)
            return False
        return True

    def open_vectors(self, dim: int, index_type: str) -> tuple[VectorStore, bool]:
        """For a build: the saved vectors, or a new store of ``dim``; True when a damaged file was set aside
        (as ``vectors.faiss.damaged``) for the new store."""
        if self.vectors_path.exists():
            try:
                store = VectorStore.load(self.vectors_path)
            except VectorFileError:
                # The catalog still knows every image and region: with an empty store each image counts as
                # not indexed (its regions have no vectors) and is described again.
                os.replace(self.vectors_path, self.vectors_path.with_name(VECTORS_FILE + ".damaged"))
                return VectorStore.create(dim, index_type), True
            if store.dim == dim or len(store):  # an empty store of another size is a killed first build's
                return store, False
        return VectorStore.create(dim, index_type), False

    # -- building ------------------------------------------------------------

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The build lock, for the ``with`` block, or :class:`hassod.locks.BusyError`.

        Two builds at once would each save their own vector file over the
        other's while both write catalog rows, leaving regions without vectors.
        """
        return exclusive(self.directory / LOCK_FILE, f"another `hassod index build` (pid {{pid}}) is writing "
                                                     f"{self.directory}; run this one when it has finished")

    def claim(self) -> str | None:
        """Tie the directory to its catalog when that lives elsewhere (``db_url``); the id the two share.

        One database holds one index: a second directory building into it would
        count the first's images as its own, without their vectors. So the
        catalog's configuration and ``index.json`` share an id, the directory
        remembers ``db_url`` only once it opened (a mistyped URL does not
        stick), and another directory's catalog raises
        :class:`IncompatibleIndexError`. None for the SQLite catalog inside.
        """
        pointer = self.directory / POINTER_FILE
        remembered = self._pointer()
        if self.db_url is None and not remembered:
            return None
        stored = self.catalog.get_config() or {}
        claimed = stored.get("index_id")
        if claimed is not None and claimed != remembered.get("index_id"):
            raise IncompatibleIndexError(
                f"the catalog at {masked_url(self.db_url or remembered['catalog'])} holds the index of another "
                "directory; give every index its own database")
        index_id = claimed or remembered.get("index_id") or uuid.uuid4().hex
        if stored and claimed is None:  # built before catalogs carried the id: its first directory claims it
            self.catalog.set_config({**stored, "index_id": index_id})
            self._config = None
        with atomic_write(pointer) as handle:
            handle.write(json.dumps({"catalog": self.db_url or remembered["catalog"], "index_id": index_id}))
        return index_id

    def record_config(self, config: IndexConfig) -> None:
        """Store the configuration of the first build (a later build keeps the first's)."""
        if self.catalog.get_config() is None:
            self.catalog.set_config(config.to_dict())
            self._config = None

    # -- reading ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Images, searchable regions by level, vectors, whitening, configuration and bytes on disk.

        Regions are counted as a search sees them: those with a vector (a
        killed build can leave catalog rows whose vectors were never saved).
        A damaged vectors or whitening file raises here, as a search would.
        """
        catalog, store, whitening = self.catalog, self.vectors, self.whitening
        by_level = {name: int(store.contains(catalog.region_ids(level)).sum())
                    for level, name in enumerate(LEVEL_NAMES)}
        searchable = sum(by_level.values())
        return {**catalog.stats(), "regions": searchable, "regions_by_level": by_level,
                "regions_without_vectors": len(catalog.region_ids()) - searchable, "vectors": store.info(),
                "whitening": None if whitening is None else {"dim_in": whitening.dim_in,
                                                             "dim_out": whitening.dim_out},
                "config": self.config.to_dict() if self.config else None,
                "bytes_on_disk": sum(f.stat().st_size for f in self.data_files() if f.exists())}

    def close(self) -> None:
        """Release the catalog's connections (it reopens on the next use)."""
        if self._catalog is not None:
            self._catalog.close()
        self._catalog = self._config = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file is at ``path`` now: (inode, size, mtime in ns); None when there is none."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _as_json(value: Any) -> Any:
    """``value`` as the catalog gives it back (tuples become lists), so a new configuration equals its stored form."""
    return json.loads(json.dumps(value))
