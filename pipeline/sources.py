"""Bring the ASL alphabet data set into `data/raw/`, in the Kaggle layout, from Kaggle, a `.zip` or a folder;
and an external test set of class folders (`data.external_test`) into `data/external/` the same way.

Run by the `fetch` stage (`python -m pipeline fetch`). Every source is untrusted: each member's path, type and
size is checked while the whole source is planned, before one byte is written to a staging folder that is then
swapped in, so a refused or interrupted ingest leaves the previous `data/raw/` as it was.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, NoReturn

from pipeline.dataset import CLASSES, EXTERNAL_KAGGLE_DATASET, KAGGLE_DATASET, TEST_DIR, TRAIN_DIR
from pipeline.errors import UserError
from pipeline.fileio import remove_leftovers, swap_in
from pipeline.serving.imaging import IMAGE_SUFFIXES

KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
MAX_REPORTED_IGNORED = 50
"""The report names at most this many ignored files (and counts them all)."""
MAX_FILE_BYTES = 64 << 20
"""Per image file: generous for a photo (the data set's are about 15 KB), yet one file cannot fill a disk."""
MAX_TOTAL_BYTES = 32 << 30
"""All images together: the real data set is about 1.1 GB, so this leaves room for a larger release."""
MAX_RATIO = 100
"""Per zip member above RATIO_CHECKED_ABOVE: JPEG and PNG barely compress; a zip bomb's zeros reach ~1000."""
RATIO_CHECKED_ABOVE = 1 << 20
"""Smaller members may compress well (flat test images) and cannot fill a disk whatever their ratio."""
FREE_SPACE_MARGIN = 512 << 20
"""Left free after the ingest: preprocess, MLflow and the system write to the same disk next."""

_CLASS_BY_FOLDED = {name.casefold(): name for name in CLASSES}
_DRIVE = re.compile(r"[A-Za-z]:")
_LAYOUT = (
    f"expected {TRAIN_DIR}/[{TRAIN_DIR}/]<class>/<image> and optionally"
    f" {TEST_DIR}/[{TEST_DIR}/]<class>_test.<ext>, at the top or inside one wrapping folder"
)
_POINT_SOURCE = (
    f"set data.source in params.yaml to the Kaggle archive (.zip from {KAGGLE_URL}) or its extracted folder"
)
_EXTERNAL_LAYOUT = "expected <class>/<image>, at the top or inside up to two wrapping folders"
_POINT_EXTERNAL = (
    "set data.external_test in params.yaml to a .zip or folder of class folders (like"
    f" https://www.kaggle.com/datasets/{EXTERNAL_KAGGLE_DATASET}), or to null"
)
_REBUILD_ZIP = (
    "rebuild the archive from the original images, or extract it with a tool you trust"
    " and set data.source to the folder"
)


@dataclass(frozen=True)
class IngestReport:
    train_files: int
    test_files: int
    ignored: tuple[str, ...]
    """Names skipped (non-image, `__MACOSX/`, dotfiles, outside the data set folders): the first
    MAX_REPORTED_IGNORED of them."""
    ignored_count: int
    """How many names were skipped in all."""
    source: str
    """`kaggle:grassknoted/asl-alphabet`, or the resolved path of the archive or folder."""


def ingest_source(source: str, target: Path, *, base_dir: Path) -> IngestReport:
    """Write the data set named by `source` to `target` in the canonical layout.

    `source` is `kaggle`, or a path (relative to `base_dir` unless absolute) to a `.zip` archive
    or a folder in the Kaggle layout. `synthetic` is generated elsewhere and is a ValueError here.
    """
    if source.strip() == "synthetic":
        raise ValueError("ingest_source does not handle 'synthetic'; the synthetic generator writes it")
    if source.strip() == "kaggle":
        return _ingest(_fetch_kaggle(), Path(target), label=f"kaggle:{KAGGLE_DATASET}")
    path = _resolve_source(source, Path(base_dir))
    return _ingest(path, Path(target), label=str(path))


def ingest_external(source: str, target: Path, *, base_dir: Path) -> IngestReport:
    """Write the external test set named by `source` to `target` as `<class>/<image>`.

    `source` is `kaggle` (danrasband/asl-alphabet-test: other signers, 30 images per class) or a path
    to a `.zip` or folder of class folders. Its images count as `test_files` in the report.
    """
    if source.strip() == "kaggle":
        path, label = _fetch_kaggle(EXTERNAL_KAGGLE_DATASET), f"kaggle:{EXTERNAL_KAGGLE_DATASET}"
    else:
        path = _resolve_source(source, Path(base_dir), key="data.external_test")
        label = str(path)
    return _ingest(path, Path(target), label=label, layout=EXTERNAL)


# ---------------------------------------------------------------- where the data comes from


def _download_kaggle(dataset: str = KAGGLE_DATASET) -> Path:
    """Download the data set (or reuse kagglehub's cache); returns the local folder.

    Separate from `_fetch_kaggle` so tests can replace the network call.
    """
    import kagglehub  # lazy: only this source needs it, and importing it is slow

    return Path(kagglehub.dataset_download(dataset))


def _fetch_kaggle(dataset: str = KAGGLE_DATASET) -> Path:
    key = "data.source" if dataset == KAGGLE_DATASET else "data.external_test"
    manual = (
        f"download the archive by hand from https://www.kaggle.com/datasets/{dataset} and set {key} in"
        " params.yaml to the path of the .zip or extracted folder"
    )
    try:
        return _download_kaggle() if dataset == KAGGLE_DATASET else _download_kaggle(dataset)
    except ImportError as exc:
        raise UserError(
            f"{key} 'kaggle' needs the kagglehub package ({_one_line(exc)});"
            f" fix: pip install kagglehub, or {manual}"
        ) from exc
    except Exception as exc:  # requests, HTTP, auth or kagglehub's own errors: all mean "no download"
        raise UserError(
            f"could not download {dataset} from Kaggle ({_one_line(exc)}); fix: set Kaggle credentials"
            f" (KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json), or {manual}"
        ) from exc


def _resolve_source(source: str, base_dir: Path, key: str = "data.source") -> Path:
    path = Path(source.strip()).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.exists() and key != "data.source":
        raise UserError(
            f"{key} path {source!r} does not exist (looked at {str(path)!r}); fix: {_POINT_EXTERNAL}"
        )
    if not path.exists():
        raise UserError(
            f"data.source path {source!r} does not exist (looked at {str(path)!r}); fix: download the archive"
            f" from {KAGGLE_URL} and set data.source in params.yaml to the .zip or its extracted folder,"
            " or set data.source to 'kaggle' (needs network and credentials) or 'synthetic' (offline)"
        )
    return path


def _ingest(path: Path, target: Path, *, label: str, layout: _Layout | None = None) -> IngestReport:
    layout = layout or KAGGLE
    _refuse_overlap(path, target, layout.key)
    if path.is_dir():
        plan = _scan_folder(path, layout)
        _commit(plan, target, label, lambda file: file.open("rb"))  # closed by _write_files
    elif path.suffix.lower() == ".zip":
        with _zip_errors(path), zipfile.ZipFile(path) as archive:
            plan = _scan_zip(archive, layout)
            _commit(plan, target, label, lambda info: archive.open(_read_up_to_limit(info)))
    else:
        raise UserError(
            f"{layout.key} {str(path)!r} is neither a .zip archive nor a folder; fix: {layout.point}"
        )
    return IngestReport(plan.train_files, plan.test_files, plan.reported_ignored(), len(plan.ignored), label)


def _refuse_overlap(source: Path, target: Path, key: str = "data.source") -> None:
    # The target is deleted and replaced: a source inside it would be destroyed, and a target
    # inside a folder source would be read back (with its temporary sibling) as more data.
    src, dst = source.resolve(), target.resolve()
    if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise UserError(
            f"{key} {str(source)!r} overlaps the output folder {str(target)!r}, which is replaced"
            f" on every ingest; fix: keep the archive or extracted folder outside {str(target)!r}"
            " and outside any folder containing it"
        )


@contextmanager
def _zip_errors(path: Path) -> Iterator[None]:
    """Turns an unreadable archive (corrupt, truncated, exotic compression) into a UserError."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise UserError(
            f"cannot read the archive {str(path)!r} ({_one_line(exc)}); fix: download it again,"
            " or extract it with another tool and set data.source to the extracted folder"
        ) from exc


# ---------------------------------------------------------------- planning: what goes where


@dataclass(frozen=True)
class _File:
    member: str
    """The name in the source, for messages."""
    handle: Any
    """What the opener takes: a ZipInfo or a Path."""
    size: int
    """Bytes it declares (zip) or had when scanned (folder); writing more is refused."""
    packed: int | None
    """Compressed bytes of a zip member; None for a folder's file."""


@dataclass(frozen=True)
class _Layout:
    """How a source's images map onto the target, and how to talk about it."""

    key: str
    """The param that names the source."""
    place: Callable[[tuple[str, ...], str], tuple[str, ...] | None]
    """(parts, member) -> destination parts; None: not part of the data set (ignored)."""
    expected: str
    point: str
    """The fix for a source that is not in this layout."""


@dataclass
class _Plan:
    """Every file to write (destination parts -> _File), built before copying."""

    zipped: bool
    layout: _Layout | None = None
    """None: the Kaggle layout of the main data set."""
    files: dict[tuple[str, ...], _File] = field(default_factory=dict)
    ignored: dict[str, None] = field(default_factory=dict)  # a dict keeps order and drops repeats
    train_files: int = 0
    test_files: int = 0

    def add(self, member: str, parts: tuple[str, ...], handle: Any, size: int, packed: int | None) -> None:
        """Place the file at `parts` (normalised, relative to the source root), or record it as ignored."""
        skipped = _ignored_name(parts)
        # Looked up when called, so that a test replacing _canonical_parts reaches the main layout.
        place = self.layout.place if self.layout is not None else _canonical_parts
        dest = None if skipped else place(parts, member)
        if dest is None:
            self.ignored[skipped or member] = None
            return
        if dest in self.files:
            other = self.files[dest].member
            raise UserError(
                f"{other!r} and {member!r} would both become {'/'.join(dest)!r};"
                " fix: keep only one copy of the data set in the source"
            )
        self.files[dest] = _File(member, handle, size, packed)
        if dest[0] == TRAIN_DIR:
            self.train_files += 1
        else:  # the Kaggle test folder, or an external set's class folder
            self.test_files += 1

    def reported_ignored(self) -> tuple[str, ...]:
        return tuple(list(self.ignored)[:MAX_REPORTED_IGNORED])

    def refusal(self, member: str, size: int, why: str) -> UserError:
        """A size refusal phrased for this kind of source, with its fix."""
        if self.zipped:
            return UserError(f"zip member {member!r} declares {size} bytes, {why}; fix: {_REBUILD_ZIP}")
        return UserError(
            f"file {member!r} in the source folder has {size} bytes, {why}; fix: remove it from the source"
            " folder or replace it with the original image, or download the data set again"
        )


def _ignored_name(parts: tuple[str, ...]) -> str | None:
    """The name to report if this file is not data (macOS metadata, hidden, not an image), else None."""
    for depth, part in enumerate(parts[:-1]):
        if _is_hidden(part):  # report the folder once rather than every file in it
            return "/".join(parts[: depth + 1]) + "/"
    if _is_hidden(parts[-1]) or PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return "/".join(parts)
    return None


def _is_hidden(name: str) -> bool:
    return name == "__MACOSX" or name.startswith(".")


def _canonical_parts(parts: tuple[str, ...], member: str) -> tuple[str, ...] | None:
    """Where an image belongs under the target; None if it lies outside the data set folders."""
    # The split folder may sit at the top or inside one wrapping folder (hand-made zips).
    at = next((i for i, part in enumerate(parts[:2]) if part.lower() in (TRAIN_DIR, TEST_DIR)), None)
    if at is None:
        return None
    split, rest = parts[at].lower(), parts[at + 1 :]
    if len(rest) > 1 and rest[0].lower() == split:  # Kaggle ships the split folder doubled
        rest = rest[1:]
    if split == TRAIN_DIR and len(rest) == 2:
        return (TRAIN_DIR, TRAIN_DIR, _class_folder(rest[0], member), rest[1])
    if split == TEST_DIR and len(rest) == 1:
        return (TEST_DIR, TEST_DIR, _test_file_name(rest[0], member))
    raise UserError(f"image {member!r} is not where the layout puts images: {_LAYOUT}; fix: {_POINT_SOURCE}")


def _class_folder(folder: str, member: str) -> str:
    canonical = _CLASS_BY_FOLDED.get(folder.casefold())
    if canonical is None:
        raise UserError(
            f"unknown class folder {folder!r} (at {member!r}); expected one of {', '.join(CLASSES)};"
            " fix: rename or remove that folder, or point data.source at the unmodified Kaggle archive"
        )
    return canonical


def _test_file_name(name: str, member: str) -> str:
    """`<class>_test.<ext>` with the class in canonical case (`DEL_test.jpg` -> `del_test.jpg`)."""
    stem = PurePosixPath(name).stem
    is_test = stem.lower().endswith("_test")
    canonical = _CLASS_BY_FOLDED.get(stem[: -len("_test")].casefold()) if is_test else None
    if canonical is None:
        raise UserError(
            f"test image {member!r} is not named <class>_test.<ext> with <class> one of {', '.join(CLASSES)};"
            " fix: rename or remove it, or point data.source at the unmodified Kaggle archive"
        )
    return canonical + name[len(stem) - len("_test") :]


def _external_parts(parts: tuple[str, ...], member: str) -> tuple[str, ...] | None:
    """`<class>/<image>` under up to two wrapping folders (kagglehub's folder, the archive's own)."""
    if len(parts) < 2:
        return None
    if len(parts) > 4:
        _misplaced(member)
    canonical = _CLASS_BY_FOLDED.get(parts[-2].casefold())
    if canonical is None:
        if len(parts) == 2:  # a file inside a top folder that is no class: not data
            return None
        raise UserError(
            f"unknown class folder {parts[-2]!r} (at {member!r}) in the external test set; expected one of"
            f" {', '.join(CLASSES)}; fix: rename or remove that folder, or {_POINT_EXTERNAL}"
        )
    return (canonical, parts[-1])


def _misplaced(member: str) -> NoReturn:
    raise UserError(
        f"image {member!r} is not where the layout puts images: {_EXTERNAL_LAYOUT}; fix: {_POINT_EXTERNAL}"
    )


KAGGLE = _Layout("data.source", _canonical_parts, _LAYOUT, _POINT_SOURCE)
EXTERNAL = _Layout("data.external_test", _external_parts, _EXTERNAL_LAYOUT, _POINT_EXTERNAL)


def _scan_zip(archive: zipfile.ZipFile, layout: _Layout | None = None) -> _Plan:
    plan = _Plan(zipped=True, layout=None if layout is KAGGLE else layout)
    for info in archive.infolist():
        parts = _safe_member_parts(info)
        if info.is_dir() or not parts:
            continue
        if info.flag_bits & 0x1:  # refuse before copying, not halfway through
            raise _refused(info.filename, "is encrypted", "rebuild the archive without a password")
        plan.add(info.filename, parts, info, info.file_size, info.compress_size)
    return plan


def _read_up_to_limit(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """The member as zipfile should read it: up to the per-file limit instead of its declared size.

    zipfile cuts a member at its declared size and then fails its CRC, which hides a forged size
    behind "Bad CRC-32"; reading on lets `_copy_at_most` stop the member and say what it is.
    """
    lenient = copy.copy(info)
    lenient.file_size = max(info.file_size, MAX_FILE_BYTES) + 1
    return lenient


def _safe_member_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The member's path as normalised parts; refuses anything that could land outside the target."""
    name, kind = info.filename, stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise _refused(
            name, "is a symbolic link (it could point anywhere)", "rebuild the archive without links"
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _refused(name, "is not a regular file", "rebuild the archive with regular files only")
    path = name.replace("\\", "/")  # archives made on Windows may use backslashes
    if path.startswith("/") or _DRIVE.match(path):
        raise _refused(name, "has an absolute path", "rebuild the archive with relative paths")
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if not parts:
                raise _refused(
                    name, "points outside the archive with '..'", "rebuild the archive without '..' in paths"
                )
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return tuple(parts)


def _refused(member: str, why: str, fix: str) -> UserError:
    return UserError(f"zip member {member!r} {why}, which is refused; fix: {fix}")


def _scan_folder(root: Path, layout: _Layout | None = None) -> _Plan:
    plan = _Plan(zipped=False, layout=None if layout is KAGGLE else layout)
    pending: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        for entry in entries:
            parts, member = prefix + (entry.name,), "/".join(prefix + (entry.name,))
            if _is_hidden(entry.name):  # never read, so never followed either
                plan.ignored[member + ("/" if entry.is_dir(follow_symlinks=False) else "")] = None
            elif entry.is_symlink():  # refused, not skipped: skipping could silently drop part of the data
                raise UserError(
                    f"{member!r} in the source folder {str(root)!r} is a symbolic link, which is refused"
                    " (it could point anywhere); fix: replace the link with a copy of the files it points to"
                )
            elif entry.is_dir(follow_symlinks=False):
                pending.append((Path(entry.path), parts))
            elif entry.is_file(follow_symlinks=False):
                plan.add(member, parts, Path(entry.path), entry.stat(follow_symlinks=False).st_size, None)
            else:  # sockets, pipes, devices: not data
                plan.ignored[member] = None
    return plan


# ---------------------------------------------------------------- writing


def _commit(plan: _Plan, target: Path, label: str, open_member: Callable[[Any], IO[bytes]]) -> None:
    """Write the plan to a temporary sibling of `target`, then swap it in; no half-written target."""
    if plan.layout is not None and not plan.files:
        raise UserError(f"no images found in {label!r}: {plan.layout.expected}; fix: {plan.layout.point}")
    if plan.layout is None and plan.train_files == 0:
        raise UserError(f"no training images found in {label!r}: {_LAYOUT}; fix: {_POINT_SOURCE}")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    _check_sizes(plan, target, label)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        _write_files(plan, staging, open_member)
        swap_in(staging, target)
    except BaseException:  # KeyboardInterrupt too: never leave a staging folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_sizes(plan: _Plan, target: Path, label: str) -> None:
    """Refuse, before writing, a source that would fill the disk: a zip bomb, or simply too much data.

    Only the files to be written count: ignored members are never read.
    """
    total = 0
    for file in plan.files.values():
        if file.size > MAX_FILE_BYTES:
            why = f"over the limit of {MAX_FILE_BYTES} bytes per file (a real photo is far smaller)"
            raise plan.refusal(file.member, file.size, why)
        packed = file.packed
        if packed is not None and file.size > RATIO_CHECKED_ABOVE and file.size > MAX_RATIO * packed:
            why = (
                f"compressed into {packed}, over the limit of {MAX_RATIO}:1 for members over"
                f" {RATIO_CHECKED_ABOVE} bytes (a real photo barely compresses: a zip bomb does)"
            )
            raise plan.refusal(file.member, file.size, why)
        total += file.size
        if total > MAX_TOTAL_BYTES:
            why = (
                f"which brings the total to {total} bytes, over the limit of {MAX_TOTAL_BYTES} bytes"
                " for all images (the real data set is about 1.1 GB)"
            )
            raise plan.refusal(file.member, file.size, why)
    free = shutil.disk_usage(target.parent).free
    if total + FREE_SPACE_MARGIN > free:
        raise UserError(
            f"{label!r} holds {total} bytes of images, but only {free} bytes are free where {str(target)!r}"
            f" goes and {FREE_SPACE_MARGIN} bytes must stay free for the next stages; fix: free up space"
            " on that file system, or set data.source to a smaller data set"
        )


def _write_files(plan: _Plan, root: Path, open_member: Callable[[Any], IO[bytes]]) -> None:
    inside = root.resolve()
    for dest_parts, file in plan.files.items():
        dest = root.joinpath(*dest_parts)
        # Destinations are built from checked names; verify anyway, it is the last line of defence.
        if not dest.resolve().is_relative_to(inside):
            raise UserError(
                f"{file.member!r} would be written outside {str(root)!r}, which is refused;"
                f" fix: {_POINT_SOURCE}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        # "x": never write through an existing file or link
        with open_member(file.handle) as src, open(dest, "xb") as out:
            _copy_at_most(src, out, file, plan)


def _copy_at_most(src: IO[bytes], out: IO[bytes], file: _File, plan: _Plan) -> None:
    """Copy, refusing as soon as `src` yields more than `file.size` bytes: a forged zip header, or a
    folder's file that grew after the scan, must not get past the size checked before writing."""
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > file.size and plan.zipped:
            raise plan.refusal(file.member, file.size, "but inflates to more (a forged header)")
        if written > file.size:
            raise UserError(
                f"file {file.member!r} in the source folder grew past its {file.size} bytes while being"
                " copied; fix: wait until nothing writes to the source folder, then run fetch again"
            )
        out.write(chunk)


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: UserError messages must fit on a single line."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."
