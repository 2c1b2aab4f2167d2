"""Walking an image folder: which files are data (hidden and tool items are not, at any depth; linked
folders are followed unless their files are read anyway) and which images lie outside every class
folder. Shared by the sources (`--data`) and by `predict`'s folders, so both read the same files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pipeline.data.decode import IMAGE_SUFFIXES
from pipeline.errors import DataWarning, UserError

# Names of image files: what the decoder reads, plus formats it refuses by name (HEIC from phones), so a
# loose one beside the class folders, or one given as --data, is named as an image
IMAGE_NAME_SUFFIXES = frozenset(IMAGE_SUFFIXES) | {".heic", ".heif", ".avif"}
# Folders and files that tools and operating systems leave beside images; never data.
HIDDEN_NAMES = frozenset({"@eaDir", "__MACOSX", ".ipynb_checkpoints", "Thumbs.db", ".DS_Store"})


def is_hidden(relative_path: str | os.PathLike) -> bool:
    """Whether a path (relative to the data root) lies in or is a hidden or tool item at any depth:
    a name starting with '.', or @eaDir, __MACOSX, .ipynb_checkpoints, Thumbs.db, .DS_Store."""
    return any(part.startswith(".") or part in HIDDEN_NAMES
               for part in Path(relative_path).parts if part not in ("", ".", ".."))


def visible_files(folder: Path) -> list[Path]:
    """Files under `folder` at any depth, skipping hidden and tool folders and files (`is_hidden`), in
    name order (real folders before links). A linked sub-folder is followed, as a linked class folder
    is, unless its files are read anyway: a link to a folder inside this one (they keep their real
    names), to one a link already led to, or back to a folder above (a loop: a warning names it). A
    link whose target is gone is listed, so it is skipped as a missing file with its reason."""
    out = []

    def unreadable(err: OSError) -> None:  # os.walk would skip it silently: a folder it cannot read is not empty
        raise UserError(f"cannot read {err.filename} ({err.strerror}); check its permissions") from None

    home = os.path.realpath(folder)
    followed: set[str] = set()  # real paths of the linked folders read (a second link to one is not)
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        here = os.path.realpath(dirpath)
        names = [d for d in sorted(dirnames) if not is_hidden(d)]
        links = {d for d in names if os.path.islink(os.path.join(dirpath, d))}
        # real folders first, unless a link led to them before (their files are listed under it)
        keep = [d for d in names if d not in links and os.path.realpath(os.path.join(dirpath, d)) not in followed]
        for d in (d for d in names if d in links):
            link = os.path.join(dirpath, d)
            target = os.path.realpath(link)
            if os.path.commonpath([here, target]) == target or os.path.commonpath([home, target]) == target:
                warnings.warn(f"not following {link}: it links back to {target}, a folder above it (a loop)",
                              DataWarning, stacklevel=4)
            elif os.path.commonpath([home, target]) == home:
                pass  # inside this folder: its files are listed under their own names
            elif target in followed:
                warnings.warn(f"not following {link}: another link already led to {target}", DataWarning,
                              stacklevel=4)
            else:
                followed.add(target)
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            if not is_hidden(f) and (os.path.isfile(p) or (os.path.islink(p) and not os.path.exists(p))):
                out.append(utf8_named(Path(p)))
    return out


def loose_images(base: Path) -> list[str]:
    """Names of image files directly in `base`, beside its class (or split) folders: in no class."""
    try:
        return sorted(p.name for p in base.iterdir() if p.is_file() and not is_hidden(p.name)
                      and p.suffix.lower() in IMAGE_NAME_SUFFIXES)
    except OSError:
        return []


def utf8_named(path: Path) -> Path:
    """`path`, or UserError where its name is not UTF-8 (Python holds the stray bytes as surrogates,
    which no cache, manifest or report can store)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{os.fsencode(path)!r} is not named in UTF-8, which the cache stores names in; rename it "
                        f"(e.g. convmv -f latin1 -t utf8 --notest -r on its folder)") from None
    return path
