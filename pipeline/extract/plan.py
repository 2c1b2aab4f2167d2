"""Plan an extraction: resolve a request into its backbone row, input size, cache key and file
names. Fast and light: lists files, imports neither Keras nor a backend library, so a second
identical request is answered from disk in well under a second.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import backbones
from pipeline.backend import library_version, name as backend_name
from pipeline.data.augment import AugmentConfig
from pipeline.data.decode import RESIZE_METHODS, identity as decoder_identity
from pipeline.data.sources import BUILTIN_DEFAULT, SplitConfig, open_source
from pipeline.errors import UserError
from pipeline.features.store import parts_folder
from pipeline.layout import DEFAULT_CACHE, CacheLayout
from pipeline.locking import key_lock, shard_lock
from pipeline.versions import version

POOLINGS = ("avg", "max", "cls", "none")  # cls: a transformer's class token (keras-hub presets)
DTYPES = ("float16", "float32")
PRECISIONS = ("float32", "mixed")
MAX_IMAGE_SIZE = 2048  # larger needs RunOptions.allow_large (--allow-large): memory grows with size^2
# 2: numpy/OpenCV decoding (EXIF applied, reduced-scale JPEG), uint8 graph input, backend in the key
KEY_VERSION = 2


@dataclass(frozen=True)
class ExtractRequest:
    """Everything that changes the features; all of it is hashed into the cache key."""

    data: str = BUILTIN_DEFAULT
    backbone: str = backbones.DEFAULT_BACKBONE
    weights: str = "imagenet"
    image_size: int | None = None
    resize: str = "stretch"
    pooling: str = "avg"
    layer: str | None = None
    dtype: str = "float16"
    precision: str = "float32"
    augment_copies: int = 0
    augment_seed: int = 0
    augment: AugmentConfig = AugmentConfig()
    split: SplitConfig = SplitConfig()

    def __post_init__(self) -> None:
        # a keras-hub preset folder is recorded by its absolute path, so a run replays from anywhere
        # (each part of a concatenation 'a+b')
        object.__setattr__(self, "backbone", "+".join(backbones.hub.qualified(b) for b in self.backbone.split("+")))
        weights = Path(str(self.weights)).expanduser()
        if str(self.weights).lower() not in ("imagenet", "none") and weights.is_file():
            # recorded absolute, as a hub folder is, so a run finds it from any folder; the key hashes
            # the file's content, not its path, so it is unchanged
            object.__setattr__(self, "weights", str(weights.resolve()))
        if self.layer is not None and not str(self.layer).strip():  # `--layer ""` is the default output, one key
            object.__setattr__(self, "layer", None)
        _choice("--pooling", self.pooling, POOLINGS)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--precision", self.precision, PRECISIONS)
        _choice("--resize", self.resize, RESIZE_METHODS)
        if self.augment_copies < 0:
            raise UserError("--augment-copies must be 0 or more")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def feature_flags(self) -> list[str]:
        """The command-line options, other than the data and its split, that ask for these features
        again (those not at their defaults): what a command on another listing of the same files
        needs in order to reuse their cached rows (audit's cleaned.csv)."""
        default = ExtractRequest()
        flags: list[str] = []
        for name in ("backbone", "weights", "image_size", "resize", "pooling", "layer", "dtype", "precision",
                     "augment_copies", "augment_seed"):
            value = getattr(self, name)
            if value != getattr(default, name):
                flags += [f"--{name.replace('_', '-')}", str(value)]
        if self.augment_copies and self.augment != default.augment:
            flags += ["--augment-ops", self.augment.ops_spec()]
        return flags

    @classmethod
    def recorded_flags(cls, recorded: dict[str, Any] | None) -> list[str]:
        """`feature_flags` of the request a cache recorded, a weights file named absolutely (the command
        may run from elsewhere); [] where it records none, or one of another version."""
        try:
            flags = cls.from_json(recorded).feature_flags() if recorded else []
        except (UserError, ValueError):
            return []
        for i in range(len(flags) - 1):
            if flags[i] == "--weights" and flags[i + 1] not in ("imagenet", "none") and Path(flags[i + 1]).exists():
                flags[i + 1] = str(Path(flags[i + 1]).resolve())
        return flags

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ExtractRequest":
        """The request a cache file or run recorded; UserError when it has fields this version does not
        know (written by another version) or of the wrong shape."""
        try:
            d = dict(d)
            d["augment"] = AugmentConfig(**(d.get("augment") or {}))
            sp = dict(d.get("split") or {})
            if "folder_names" in sp:
                sp["folder_names"] = tuple(sp["folder_names"])
            d["split"] = SplitConfig(**sp)
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise UserError(f"a recorded extraction request this version cannot read ({exc}); it was written by "
                            f"another version or edited: re-run the command that made it") from None


@dataclass
class RunOptions:
    """Runtime-only settings: they never change the features, so they stay out of the key."""

    cache_dir: Path = DEFAULT_CACHE
    batch_size: int = 32
    force: bool = False
    compression: str | None = None
    chunk_units: int = 512
    progress: bool = True
    jit: bool | None = None  # None: XLA on a GPU only (TensorFlow); JAX always compiles
    workers: int | None = None  # decode threads (None: one per core)
    allow_large: bool = False  # permit --image-size above MAX_IMAGE_SIZE
    reuse: bool = True  # copy rows of unchanged images from a cache that differs only in its data listing
    shard: tuple[int, int] | None = None  # (I, N): compute only chunks c with c % N == I (job arrays)
    content_hash: bool = False  # also store each file's SHA-256; reuse then matches bytes, not size+mtime
    warn_moved: bool = True  # say which reused images changed split (a head's concern; evaluate scores any split)


@dataclass
class ExtractResult:
    path: Path
    key: str
    cache_hit: bool
    n_rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    resumed_from: int = 0
    computed: int = 0
    run_id: str | None = None
    reused: int = 0  # rows copied from `reused_from`, an older cache of the same request on other data
    reused_from: Path | None = None
    shard: tuple[int, int] | None = None
    n_chunks: int = 0
    missing_chunks: list[int] = field(default_factory=list)  # a shard's run: chunks other shards still owe
    n_shards: int = 0  # a shard's run: how many shards split the chunks (--shard 0/1 may leave running ones theirs)
    distributor: str = "local"  # how it was computed: local | shard | ray | concat (joined caches)
    parts: list[Path] = field(default_factory=list)  # a concatenation 'a+b': the backbone caches it joins
    model_seconds: float = 0.0  # of `seconds`, building the backbone (0 where this process kept it, or Ray's actors built it)


def image_rate(computed: int, seconds: float, model_seconds: float = 0.0) -> float:
    """Images computed per second, the backbone's build left out: it is not throughput (one new image
    read 0.2 images/s when the build counted)."""
    busy = seconds - model_seconds
    return computed / busy if computed and busy > 0 else 0.0


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, not {value!r}")


@dataclass
class Plan:
    """The resolved request: backbone row, input size, key material and file names. No Keras."""

    request: ExtractRequest
    spec: backbones.Backbone
    size: int
    key_material: dict[str, Any]
    key: str
    path: Path
    source: Any

    @property
    def parts(self) -> Path:
        return parts_folder(self.path)

    @property
    def lock(self) -> Path:
        return key_lock(self.path)

    def shard_lock(self, i: int, n: int) -> Path:
        """The lock a run of `--shard I/N` holds while it runs (shards run side by side, each under its own)."""
        return shard_lock(self.path, i, n)


def check_size(size: int, allow_large: bool = False) -> None:
    """Refuse input sizes whose activations would not fit in memory, unless asked for."""
    if size > MAX_IMAGE_SIZE and not allow_large:
        raise UserError(f"--image-size {size} is larger than {MAX_IMAGE_SIZE}; memory grows with its square "
                        f"(a batch of 32 at 4096 needs tens of GB): pass --allow-large to insist")


def plan(request: ExtractRequest, cache_dir: Path = DEFAULT_CACHE) -> Plan:
    """Resolve a request into its cache key and file path (fast: lists files, imports no Keras)."""
    spec = backbones.get(request.backbone)
    size = spec.resolve_size(request.image_size)
    backbones.check_output(spec, request.pooling, request.layer)
    source = open_source(request.data, request.split)
    backend = backend_name()
    material = {
        "key_version": KEY_VERSION,
        "backbone": spec.name,
        "weights": backbones.weights_identity(spec, request.weights),
        "image_size": size,
        "resize": request.resize,
        "preprocess": spec.preprocess,
        "pooling": request.pooling,
        "layer": request.layer,
        "dtype": request.dtype,
        "precision": request.precision,
        "augment": ({"copies": request.augment_copies, "seed": request.augment_seed, "seeding": "name",
                     **request.augment.as_dict()} if request.augment_copies else None),
        "data": source.identity(),
        "backend": backend,
        "decoder": decoder_identity(),
        "versions": {"keras": version("keras"), backend: library_version(backend)},
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    tail = request.layer or request.pooling
    name = f"{spec.slug}-{size}-{tail}-{key[:16]}.h5".replace("/", "_")
    return Plan(request, spec, size, material, key, CacheLayout(cache_dir).features / name, source)
