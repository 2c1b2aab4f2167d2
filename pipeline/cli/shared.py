"""What several commands share beyond their options: finding (or making) the cache a command reads,
and telling what an extraction did. Command modules import from here and from `options`, never from
each other."""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from pipeline.cli.options import build_request, given_options
from pipeline.data.decode import may_read_later
from pipeline.data.sources import FileSource, open_source
from pipeline.errors import UserError
from pipeline.extract import ExtractRequest, cache_path, extract, release_models
from pipeline.features.cache import finished_file
from pipeline.features.store import FeatureFile, skipped_files
from pipeline.layout import FEATURES, CacheLayout


def report_extraction(result) -> None:
    """Print what an extraction did: cache hit or rate, and any skipped files."""
    if result.cache_hit:
        click.echo(f"cache hit: {result.path}")
        skipped = skipped_files(result.path)
        if skipped:  # said once when extracted; a later command reads the same cache without them
            readable = next((p for p, why in skipped if may_read_later(why) and os.access(p, os.R_OK)), None)
            retry = (f"; some of them can be read now (e.g. {shown_path(readable)}): `touch` those and run this "
                     f"again to compute only the images without a row" if readable else "")
            click.echo(f"note: when this cache was made it {skipped_message(skipped)}{retry}", err=True)
        return
    if result.shard is not None and (result.missing_chunks or not result.n_rows):
        i, n = result.shard
        click.echo(f"shard {i}/{n}: computed {result.computed} image(s)"
                   + (f", reused {result.reused}" if result.reused else ""))
        if result.missing_chunks:
            split = result.n_shards or n
            owners = sorted({c % split for c in result.missing_chunks})
            click.echo(f"{result.n_chunks - len(result.missing_chunks)} of {result.n_chunks} chunks present; "
                       f"waiting for shard(s) {', '.join(f'{k}/{split}' for k in owners)}; the last shard to finish "
                       f"(or a plain extract afterwards) assembles {result.path.name}")
        else:
            click.echo(f"every chunk is present; {result.path.name} is assembled by another process")
        return
    built = f"; backbone built in {result.model_seconds:.1f} s" if result.computed and result.model_seconds >= 0.05 else ""
    if result.distributor == "concat":
        rate = f" at {result.images_per_s:.1f} images/s{built}" if result.computed else ""
        click.echo(f"wrote {result.path} ({result.n_rows} rows joined from {len(result.parts)} backbone caches; "
                   f"computed {result.computed}{rate})")
        return
    reused = f"reused {result.reused} unchanged from {result.reused_from.name}, " if result.reused else ""
    if result.computed:
        click.echo(f"wrote {result.path} ({result.n_rows} rows; {reused}computed {result.computed} at "
                   f"{result.images_per_s:.1f} images/s{built})")
    elif reused:
        click.echo(f"wrote {result.path} ({result.n_rows} rows; {reused}computed 0)")
    else:
        click.echo(f"wrote {result.path} ({result.n_rows} rows, assembled from finished chunks)")
    if result.skipped:
        click.echo(skipped_message(result.skipped, "(listed in the file's skipped_paths and skipped_reasons)"),
                   err=True)


def shown_path(path: str) -> str:
    """A path as printed on one line: control characters (a newline in a file name) escaped as Python
    writes them, so the tab-separated lines of `predict` stay one per image; other text as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path))


def skipped_message(skipped: list[tuple[str, str]], tail: str = "") -> str:
    """One line: how many files were skipped, the first few with their reasons."""
    shown = ", ".join(f"{shown_path(p)} ({reason})" for p, reason in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"skipped {len(skipped)} file(s) that could not be used as images: {shown}{more} {tail}".rstrip()


# extract options that decide which features a request reads (with --cache they would be ignored)
FEATURE_OPTIONS = {"data", "backbone", "weights", "image_size", "resize", "pooling", "layer", "dtype", "precision",
                    "augment_copies", "augment_seed", "augment_ops", "split_names", "test_fraction", "split_seed"}


def open_cache(cache: str | None, kw: dict, command: str = "fit-head", splits: tuple[str, ...] | None = ("train",),
               request: ExtractRequest | None = None, chosen_by: frozenset[str] | set[str] = FEATURE_OPTIONS):
    """The feature file named by --cache (path or key prefix), else by `request` or the extract options,
    extracting first when the cache does not have it yet (`command` names the caller in errors; before
    extracting, image files must hold two classes in `splits`, None: in any split). `chosen_by`: the
    options the features named by --cache make void, refused beside it."""
    if cache is not None:
        given = given_options(chosen_by.__contains__)
        if given:  # features named by --cache: extract options would be silently ignored
            raise UserError(f"--cache names the features already, so {', '.join(given)} would be ignored; "
                            f"leave them out, or leave out --cache to extract with them")
        if not cache.strip():
            raise UserError("--cache is empty; give a cache file path or key prefix (`python cli.py cache ls`), "
                            "or leave --cache out to use the extract options")
        ff = FeatureFile(finished_file(cache, kw["cache_dir"], f"--cache {cache!r}"))
        if CacheLayout.holding(ff.path) is None:  # runs go beside the features: <cache>/runs/
            ff.close()
            raise UserError(f"{ff.path} is not in a cache folder's {FEATURES}/ folder, where {command} records its "
                            f"run beside it; copy it into <cache>/{FEATURES}/ and give --cache-dir <cache>")
        root = CacheLayout.of(ff.path).root
        if given_options({"cache_dir"}.__contains__) and root.resolve() != Path(kw["cache_dir"]).expanduser().resolve():
            click.echo(f"note: {ff.path.name} lies in the cache {root}: the run is recorded there, not in "
                       f"--cache-dir {kw['cache_dir']}", err=True)
        return ff
    built, options = build_request(kw)
    request = request or built
    if not cache_path(request, options.cache_dir).exists():  # one there unfinished: extract says it is damaged
        check_two_classes(request, command, splits)
        click.echo("no cached features for this request yet: extracting first", err=True)
    result = extract(request, options)
    report_extraction(result)
    release_models()  # one extraction per command: the backbone's memory goes back before the head trains
    ff = FeatureFile(result.path)
    if ff.request.get("weights") != request.weights:  # a weights file moved since the cache was made
        ff.asked_weights = request.weights
    return ff


def check_two_classes(request, command: str, splits: tuple[str, ...] | None) -> None:
    """Image files of one class (in `splits`; None: any) cannot make a head or an audit: say so before
    extracting them all."""
    source = open_source(request.data, request.split)
    if not isinstance(source, FileSource):  # tfds and built-ins: listing may mean preparing the data set
        return
    listing = source.listing()
    labels = np.asarray(listing.labels)
    where = labels >= 0
    if splits is not None:
        where &= np.isin(np.asarray(listing.splits, dtype=object), list(splits))
    labels = labels[where]
    kind = "training images" if splits == ("train",) else "labelled images"
    if labels.size == 0:
        raise UserError(f"{command} needs {kind}, but {request.data} has none; give one sub-folder per class "
                        f"or a CSV manifest with labels")
    if np.unique(labels).size < 2:
        raise UserError(f"{command} needs at least two classes with {kind}, but {request.data} has "
                        f"one ({listing.class_names[int(labels[0])]!r}); add images of another class (a folder per "
                        f"class, or rows with other labels in a manifest)")
