"""What every head shares: feature input (arrays, cache rows, reduced matrices), the `Head` base class
(metadata, compatibility checks, the per-kind hooks the rest of the tool calls), and small helpers.

A head kind lives in its own module (`logistic`, `dense`, `svm`, `knn`, `auto`) and owns everything about
it: its artifact file, its facts for metrics.json, its key parameters, its Keras form (`to_keras`,
which export, fine-tuning and MLflow use), its fine-tuning learning rate and its CLI options. The
rest of the tool calls these hooks and never branches on a kind's name; `registry` maps names to classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.backend import keras_module
from pipeline.errors import UserError
from pipeline.features.store import FeatureFile
from pipeline.heads.files import jsonable
from pipeline.heads.streaming import as_float32, default_memory_budget_mb, read_rows, read_sorted, row_spans

FLATTEN_MODES = ("flatten", "avg", "max")
# Cache attributes that identify the feature extractor; a head refuses features from another one.
FEATURE_INFO_KEYS = ("backbone", "weights_id", "image_size", "pooling", "layer")
PAD_LOGIT = -30.0  # logit of a class absent from the training labels (probability ~1e-13)
LINEAR_FINETUNE_LR = 2e-4  # fine-tuning LR under a head fitted in closed form (logistic, svm)


# ---------------------------------------------------------------------------------- feature input
@dataclass
class FeatureSource:
    """Rows of a cache file, read lazily in batches: lets heads train on data larger than memory."""

    file: FeatureFile
    rows: np.ndarray

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.file.feature_shape

    def read(self, positions: np.ndarray) -> np.ndarray:
        """Raw float32 features of `positions` (indices into `rows`), in that order."""
        return read_rows(self.file.features, self.rows[np.asarray(positions, np.int64)])

    def iter_reduced(self, flatten: str, batch_size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (positions, reduced float32 features) in disk order, at most `batch_size` rows spanning
        at most 4x that many rows of the file each, read as contiguous slices where rows are dense."""
        order = np.argsort(self.rows, kind="stable")
        srt = self.rows[order]
        for a, b in row_spans(srt, batch_size, 4 * batch_size):
            yield order[a:b], reduce_features(read_sorted(self.file.features, srt[a:b]), flatten)

    def load_reduced(self, flatten: str, batch_size: int = 1024) -> np.ndarray:
        """All rows as an in-memory (n, d) float32 array, reduced batch by batch to save memory."""
        out = np.empty((len(self), reduced_dim(self.feature_shape, flatten)), np.float32)
        for pos, x in self.iter_reduced(flatten, batch_size):
            out[pos] = x
        return out


@dataclass
class ReducedFeatures:
    """Features already reduced to an (n, d) matrix, remembering the raw feature shape they came from.

    Sweeps reduce a cache once and fit many heads on it; the heads still record (and check) the
    cache's raw feature shape.
    """

    matrix: np.ndarray
    feature_shape: tuple[int, ...]
    flatten: str

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, np.float32)
        self.feature_shape = tuple(int(s) for s in self.feature_shape)
        if self.matrix.ndim != 2 or self.matrix.shape[1] != reduced_dim(self.feature_shape, self.flatten):
            raise ValueError(f"a {self.matrix.shape} matrix cannot be {self.feature_shape} features "
                             f"reduced by {self.flatten!r}")

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @classmethod
    def of(cls, X: Any, flatten: str) -> "ReducedFeatures":
        """Reduce an array or FeatureSource once (a ReducedFeatures passes through if it matches)."""
        if isinstance(X, ReducedFeatures) and _same_reduction(X, flatten):
            return X
        return cls(to_matrix(X, flatten), raw_shape(X), flatten)


def _same_reduction(X: "ReducedFeatures", flatten: str) -> bool:
    return X.flatten == flatten or len(X.feature_shape) == 1


def reduced_dim(feature_shape: Sequence[int], flatten: str) -> int:
    """Length of one feature vector after `reduce_features`."""
    _check_flatten(flatten, feature_shape)
    if len(feature_shape) <= 1 or flatten == "flatten":
        return int(np.prod(feature_shape))
    return int(feature_shape[-1])


def reduce_features(x: np.ndarray, flatten: str) -> np.ndarray:
    """(N, ...) features -> (N, D) float32: vectors pass through; maps are flattened or pooled over space."""
    x = np.asarray(x)
    _check_flatten(flatten, x.shape[1:])
    if x.ndim == 2:
        return as_float32(x)
    if flatten == "flatten" or x.ndim == 1:
        return as_float32(x.reshape(x.shape[0], -1))
    axes = tuple(range(1, x.ndim - 1))
    out = x.mean(axis=axes, dtype=np.float32) if flatten == "avg" else x.max(axis=axes)
    return out.astype(np.float32, copy=False)


def _check_flatten(flatten: str, feature_shape: Sequence[int]) -> None:
    if flatten not in FLATTEN_MODES:
        raise UserError(f"unknown flatten mode {flatten!r}; choose one of {', '.join(FLATTEN_MODES)}")
    if len(feature_shape) > 3 and flatten != "flatten":
        raise UserError(f"features of shape {tuple(feature_shape)} can only be used with flatten='flatten'")


def n_rows(X: Any) -> int:
    """Rows of any accepted feature input (array, FeatureSource, ReducedFeatures)."""
    return len(X) if isinstance(X, (FeatureSource, ReducedFeatures)) else int(np.shape(X)[0])


def raw_shape(X: Any) -> tuple[int, ...]:
    """The cache's feature shape of one row of any accepted input (before any reduction)."""
    if isinstance(X, (FeatureSource, ReducedFeatures)):
        return tuple(X.feature_shape)
    return tuple(np.shape(X)[1:])


def to_matrix(X: Any, flatten: str) -> np.ndarray:
    """Any accepted feature input (array, FeatureSource, ReducedFeatures) as an (n, d) float32 matrix."""
    if isinstance(X, ReducedFeatures):
        if not _same_reduction(X, flatten):
            raise ValueError(f"features were reduced with {X.flatten!r}, the head uses {flatten!r}")
        return X.matrix
    if isinstance(X, FeatureSource):
        return X.load_reduced(flatten)
    return reduce_features(np.asarray(X), flatten)


def matrix_batches(X: Any, flatten: str, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, reduced batch) over any accepted input, without loading a FeatureSource whole."""
    n = n_rows(X)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if isinstance(X, ReducedFeatures):
            yield start, to_matrix(X, flatten)[start:stop]
        elif isinstance(X, FeatureSource):
            yield start, reduce_features(X.read(np.arange(start, stop)), flatten)
        else:
            yield start, reduce_features(np.asarray(X[start:stop]), flatten)


def given_positive(value: Any, name: str, auto: str = "auto", *, whole: bool = False,
                   finite: bool = False) -> float | None:
    """None for the word `auto`, else `value` as a positive float (`finite`: and not infinite; `whole`: a
    whole number >= 1, returned as an int); UserError naming `name` otherwise."""
    if value == auto:
        return None
    kind = "a whole number >= 1" if whole else "a positive number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be '{auto}' or {kind}, not {value!r}") from None
    if whole:
        if not (np.isfinite(number) and number >= 1 and number == int(number)):
            raise UserError(f"{name} must be '{auto}' or {kind}, not {value!r}")
        return int(number)
    if not number > 0:
        raise UserError(f"{name} must be positive, not {number}")
    if finite and not np.isfinite(number):
        raise UserError(f"{name} must be '{auto}' or a finite positive number, not {value!r}")
    return number


def option_C(opts: Mapping[str, Any]) -> float | str:
    """`--C` from fit-head's options: 'auto' or a positive number (NaN and such refused)."""
    number = given_positive(opts.get("C", "auto"), "--C")
    return "auto" if number is None else number


def option_budget(opts: Mapping[str, Any]) -> float:
    """`--memory-budget` in MB from fit-head's options; default a quarter of physical memory."""
    given = opts.get("memory_budget")
    return float(given) if given is not None else default_memory_budget_mb()


def option_seed(opts: Mapping[str, Any]) -> int:
    """`--seed` from fit-head's options: it draws the head's CV folds (and the dense head's batches),
    so fits over several seeds show how much the figure is the draw of its folds."""
    return int(opts.get("seed") or 0)


def feature_info_of(ff: FeatureFile) -> dict[str, Any]:
    """The cache attributes that identify how its features were made (backbone, weights, ...)."""
    return {k: ff.attrs[k] for k in FEATURE_INFO_KEYS if k in ff.attrs}


def fit_meta(ff: FeatureFile) -> dict[str, Any]:
    """What a head fitted on this cache records of it (`Head.fit`'s keywords): its class names (the label
    numbers as text where it records none), its key and how its features were made."""
    names = list(ff.class_names) or [str(i) for i in range(int(ff.labels.max()) + 1)]
    return {"class_names": names, "cache_key": ff.key, "feature_info": feature_info_of(ff)}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------- the base class
class Head(ClassifierMixin, BaseEstimator):
    """Metadata, compatibility checks and the hooks each head kind fills in for the rest of the tool."""

    kind: ClassVar[str] = "head"
    artifact: ClassVar[str] = "head.npz"           # the file a run saves it in (head.json beside it)
    file_format: ClassVar[str] = ""                # the "format" its head.json names
    key_param_names: ClassVar[tuple[str, ...]] = ("class_weight", "flatten")  # runs-table columns
    uses_validation: ClassVar[bool] = False        # fit takes the validation rows (dense: early stopping)
    tuple_params: ClassVar[tuple[str, ...]] = ()   # parameters that are tuples (JSON gives them back as lists)
    sweep_grid: ClassVar[dict[str, list[Any]] | None] = None  # `--sweep`'s default grid (None: no sweep)
    # the fit-head options (their parameter names) this kind reads in `from_options`: others given are refused
    options: ClassVar[frozenset[str]] = frozenset()
    # every kind's: how feature maps become vectors, the seed, the memory budget
    shared_options: ClassVar[frozenset[str]] = frozenset({"flatten", "seed", "memory_budget"})
    # parameters that leave a compiled model as it is: a sweep's configs differing only in them share one
    sweep_schedule_only: ClassVar[frozenset[str] | None] = None
    explains: ClassVar[bool] = False               # `neighbours` names the training images behind a prediction

    # ------------------------------------------------------------------ hooks for the rest of the tool
    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameter names (scikit-learn's get_params keys), for checking given options."""
        return list(cls._get_param_names())

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "Head":
        """The head that `fit-head`'s options describe (each kind picks the options it takes)."""
        raise NotImplementedError

    def check_params(self) -> "Head":
        """Raise UserError for a bad parameter now, before any work (fit checks them again)."""
        return self

    @classmethod
    def sweep_fits(cls, configs: list[dict[str, Any]], n_train: int) -> list[dict[str, Any]]:
        """The sweep's grid points that can be fitted on `n_train` training rows (all, for most kinds)."""
        return configs

    def fit_note(self) -> str:
        """A line to print before a fit that runs a while without a progress bar ("" for none)."""
        return ""

    def after_fit_note(self) -> str:
        """A line to print after a fit about how it went (streamed, memory held, ...; "" for none)."""
        return ""

    def outcome(self) -> tuple["Head", dict[str, Any]]:
        """(the fitted head a run saves, facts about how it was chosen): itself for all but `auto`."""
        return self, {}

    def facts(self) -> dict[str, Any]:
        """What metrics.json records about the fit beyond the metrics (C, epochs, streaming, ...)."""
        return {}

    def cross_validates(self) -> bool:
        """Whether a fit with these parameters will give `cv_log_loss` (enough rows given): known before
        fitting, so a command that ranks by it can refuse first."""
        return False

    def cv_log_loss(self) -> float | None:
        """Log loss of the fitted head's probabilities scored out of fold on its training rows, as it
        will be used (calibrated); None for a head that does not cross-validate (dense, C given, ...)."""
        return None

    def cv_accuracy(self) -> float | None:
        """Accuracy of the head's out-of-fold predictions (the svm: its one-vs-one vote) at the chosen
        parameters; None where `cv_log_loss` is None or the head keeps no such predictions."""
        return None

    def sweep_facts(self) -> dict[str, Any]:
        """The few facts a sweep's table shows beside each configuration."""
        return {}

    def fit_for_sweep(self, X: Any, y: Any, X_val: Any, y_val: Any, reuse: dict, **meta: Any) -> "Head":
        """One fit of a sweep (`reuse`: a dict kept by the sweep's worker, for heads that compile models)."""
        return self.fit(X, y, **meta)

    @classmethod
    def sweep_cost(cls, params: Mapping[str, Any]) -> float:
        """Rough relative cost of one fit with these parameters, to order a sweep's tasks."""
        return 1.0

    def key_params(self) -> dict[str, Any]:
        """The parameters worth a column in the runs table (the set ones of `key_param_names`)."""
        p = self.get_params()
        return {k: p[k] for k in self.key_param_names if p.get(k) not in (None, False)}

    def neighbours(self, X: Any, k: int | None = None):
        """The training rows nearest each row of X (`features.neighbours.Neighbours`): only heads that
        keep their training images (`explains`) can say."""
        raise UserError(f"--explain shows the training images behind each prediction, which only a knn head keeps; "
                        f"this run's head is {self.kind} (fit one with --head knn)")

    def neighbour_paths(self, nb: Any) -> list[list[str]]:
        """The image path of each neighbour in `nb` (see `neighbours`)."""
        raise UserError(f"the {self.kind} head keeps no training images")

    def training_history(self) -> dict[str, list[float]] | None:
        """Per-epoch loss, accuracy and learning rate for curves.png; None: the head does not train by epochs."""
        return None

    def c_curve(self) -> tuple[dict[float, float], float, str] | None:
        """(mean CV score per C, the chosen C, what the score is) for c_curve.png; None: no C was searched."""
        return None

    def finetune_lr(self) -> float:
        """The learning rate fine-tuning starts from under this head (far below what fitted it)."""
        return LINEAR_FINETUNE_LR

    def to_keras(self):
        """The fitted head as a Keras model named 'head': raw cache features in, probabilities out."""
        raise NotImplementedError

    def keras_head(self, feature_shape: Sequence[int], backbone: str = ""):
        """`to_keras()` after checking the head was fitted on features of this backbone and shape."""
        made_by = (getattr(self, "feature_info_", None) or {}).get("backbone")
        if made_by and backbone and made_by != backbone:
            raise UserError(f"the head was fitted on {made_by} features, not {backbone}; "
                            f"use the cache it was trained on")
        if tuple(self.feature_shape_) != tuple(int(d) for d in feature_shape):
            raise UserError(f"the head was fitted on features of shape {tuple(self.feature_shape_)}, but this "
                            f"backbone produces {tuple(feature_shape)}; use the cache the head was trained on")
        return self.to_keras()

    # ----------------------------------------------------------------------------------- metadata
    def _set_meta(self, X: Any, y: np.ndarray, class_names: Sequence[str] | None,
                  cache_key: str | None, feature_info: Mapping[str, Any] | None) -> int:
        y = np.asarray(y)
        if y.size == 0:
            raise UserError("there are no training examples")
        if y.min() < 0:
            raise UserError("training labels must be >= 0 (-1 marks unlabelled images; leave those out)")
        n_classes = len(class_names) if class_names is not None else int(y.max()) + 1
        if y.max() >= n_classes:
            raise UserError(f"label {int(y.max())} is out of range for {n_classes} class names")
        if np.unique(y).size < 2:
            raise UserError("training needs at least two classes with examples; found one")
        self.class_names_ = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        self.classes_ = np.arange(n_classes)
        self.n_classes_ = n_classes
        self.cache_key_ = cache_key
        self.feature_info_ = dict(feature_info or {})
        self.feature_shape_ = tuple(int(s) for s in raw_shape(X))
        self.n_features_in_ = reduced_dim(self.feature_shape_, self.flatten)
        return n_classes

    def copy_meta(self, other: "Head") -> None:
        """Take the fitted metadata (classes, cache key, feature shape and extractor) of `other`."""
        for name in ("class_names_", "classes_", "n_classes_", "cache_key_", "feature_info_", "feature_shape_",
                     "n_features_in_"):
            setattr(self, name, getattr(other, name))

    def _check_input(self, X: Any) -> None:
        shape = tuple(raw_shape(X))
        if shape != self.feature_shape_:
            raise UserError(f"this head was trained on features of shape {self.feature_shape_}, "
                            f"not {shape}; fit a head on features from the same backbone and layer")

    def check_matches(self, ff: FeatureFile, class_subset: bool = False) -> None:
        """Raise UserError unless `ff` holds features this head can read (shape, classes, extractor);
        with `class_subset`, the cache may hold only some of the head's classes (evaluation)."""
        if tuple(ff.feature_shape) != tuple(self.feature_shape_):
            raise UserError(f"the head expects features of shape {tuple(self.feature_shape_)} but {ff.path.name} "
                            f"holds {tuple(ff.feature_shape)}; fit a head on this cache instead")
        if class_subset:
            check_class_subset(ff.class_names, self.class_names_, ff.path.name)
        elif ff.class_names and list(ff.class_names) != list(self.class_names_):
            raise UserError(f"the head's classes ({short_names(self.class_names_)}) differ from {ff.path.name}'s "
                            f"({short_names(ff.class_names)}); use a cache of the same data set or fit a new head")
        info = feature_info_of(ff)
        diff = [k for k in info if k in self.feature_info_ and str(info[k]) != str(self.feature_info_[k])]
        if diff:
            k = diff[0]
            raise UserError(f"the head was trained on {k}={self.feature_info_[k]!r} features but {ff.path.name} "
                            f"has {k}={info[k]!r}; use a cache made the same way or fit a new head")

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class index for each row."""
        return np.argmax(self.predict_proba(X), axis=1)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description: kind, parameters, classes, cache key, feature shape and extractor."""
        return {
            "kind": self.kind, "params": jsonable(self.get_params()), "class_names": self.class_names_,
            "cache_key": self.cache_key_, "feature_shape": list(self.feature_shape_),
            "feature_info": jsonable(self.feature_info_),
        }

    def load_meta(self, meta: Mapping[str, Any]) -> None:
        """Set the fitted metadata (class names, cache key, feature info and shape) a saved head recorded."""
        self.class_names_ = list(meta["class_names"])
        self.n_classes_ = len(self.class_names_)
        self.classes_ = np.arange(self.n_classes_)
        self.cache_key_ = meta.get("cache_key")
        self.feature_info_ = dict(meta.get("feature_info") or {})
        self.feature_shape_ = tuple(int(s) for s in meta["feature_shape"])
        self.n_features_in_ = reduced_dim(self.feature_shape_, self.flatten)


def keras_reduction(feature_shape: Sequence[int], flatten: str):
    """(input, reduced output) Keras tensors: raw cache features -> the head's vectors (flatten, avg or
    max over space for maps), float32 whatever the dtype policy; the first layers of a head's Keras form."""
    keras = keras_module()
    L = keras.layers
    shape = tuple(int(d) for d in feature_shape)
    inp = keras.Input(shape, name="features", dtype="float32")
    x = inp
    if len(shape) > 1:
        rank = len(shape)
        if flatten == "flatten":
            x = L.Flatten(name="flatten", dtype="float32")(x)
        elif flatten == "avg":
            x = (L.GlobalAveragePooling2D if rank == 3 else L.GlobalAveragePooling1D)(name="avg_pool", dtype="float32")(x)
        else:
            x = (L.GlobalMaxPooling2D if rank == 3 else L.GlobalMaxPooling1D)(name="max_pool", dtype="float32")(x)
    return inp, x


def keras_logits_head(inp, x, W: np.ndarray, b: np.ndarray):
    """Close a head's Keras form: Dense logits with weights (W, b), then softmax, as a model named 'head'."""
    keras = keras_module()
    L = keras.layers
    dense = L.Dense(W.shape[1], name="logits", dtype="float32")
    x = dense(x)
    dense.set_weights([np.asarray(W, np.float32), np.asarray(b, np.float32)])
    out = L.Activation("softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inp, out, name="head")


def params_for(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from saved params, dropping unknown ones and restoring the class's tuples."""
    names = cls.param_names()
    out = {k: v for k, v in params.items() if k in names}
    for k in getattr(cls, "tuple_params", ()):
        if isinstance(out.get(k), list):
            out[k] = tuple(out[k])
    return out

def check_class_subset(data_classes: Sequence[str], head_classes: Sequence[str], where: str) -> None:
    """UserError naming the classes of `where` that the head was never trained on."""
    unknown = [c for c in data_classes if c not in set(head_classes)]
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        folded = {c.casefold(): c for c in head_classes}
        cased = [(c, folded[c.casefold()]) for c in unknown if c.casefold() in folded]
        hint = (f"; {len(cased)} of them differ from the run's only in upper and lower case ({cased[0][0]!r} and "
                f"{cased[0][1]!r}): class names are compared exactly, so rename the folders or labels" if cased else "")
        raise UserError(f"{where} has classes the run was never trained on: {shown} (the run's classes: "
                        f"{short_names(head_classes)}){hint}; evaluate on data of those classes only")


def short_names(names: Sequence[str], n: int = 4) -> str:
    """"K classes: 'a', 'b', 'c', 'd', ..." for error messages (quoted: a name may hold a comma or spaces)."""
    names = list(names)
    head = ", ".join(map(repr, map(str, names[:n])))
    return f"{len(names)} classes: {head}{', ...' if len(names) > n else ''}"


