"""Tests for `pipeline.sources` and the fetch stage: layouts accepted, junk ignored and named, hostile
archives (paths, links, zip bombs) refused, atomic output."""

from __future__ import annotations

import io
import os
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline import sources
from pipeline.config import params_from_dict
from pipeline.errors import UserError
from pipeline.fetch import IGNORED_ARTIFACT, run_fetch
from pipeline.paths import Paths
from pipeline.sources import ingest_external, ingest_source

from conftest import TINY_PARAMS, deep_merge

TRAIN = Path("asl_alphabet_train/asl_alphabet_train")
TEST = Path("asl_alphabet_test/asl_alphabet_test")


def image_bytes(fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


JPEG, PNG = image_bytes("JPEG"), image_bytes("PNG")


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def make_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "\r" not in message
    assert "fix:" in message
    return message


def assert_nothing_staged(parent: Path) -> None:
    assert not parent.exists() or not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


DOUBLED = {
    "asl_alphabet_train/asl_alphabet_train/A/A1.jpg": JPEG,
    "asl_alphabet_train/asl_alphabet_train/A/A2.jpg": JPEG,
    "asl_alphabet_train/asl_alphabet_train/del/del1.jpg": JPEG,
    "asl_alphabet_test/asl_alphabet_test/A_test.jpg": JPEG,
}
EXPECTED = {
    "asl_alphabet_train/asl_alphabet_train/A/A1.jpg",
    "asl_alphabet_train/asl_alphabet_train/A/A2.jpg",
    "asl_alphabet_train/asl_alphabet_train/del/del1.jpg",
    "asl_alphabet_test/asl_alphabet_test/A_test.jpg",
}


def test_zip_with_doubled_layout(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "asl.zip", DOUBLED)
    report = ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)  # relative to base_dir
    assert files_under(tmp_path / "raw") == EXPECTED
    assert (report.train_files, report.test_files, report.ignored) == (3, 1, ())
    assert report.source == str(archive)
    assert (tmp_path / "raw" / TRAIN / "A" / "A1.jpg").read_bytes() == JPEG
    assert_nothing_staged(tmp_path)


def test_zip_without_doubled_level(tmp_path: Path) -> None:
    members = {
        name.replace("asl_alphabet_train/asl_alphabet_train", "asl_alphabet_train").replace(
            "asl_alphabet_test/asl_alphabet_test", "asl_alphabet_test"
        ): data
        for name, data in DOUBLED.items()
    }
    make_zip(tmp_path / "asl.zip", members)
    report = ingest_source(str(tmp_path / "asl.zip"), tmp_path / "raw", base_dir=Path("/nonexistent"))
    assert files_under(tmp_path / "raw") == EXPECTED
    assert (report.train_files, report.test_files) == (3, 1)


def test_zip_with_one_wrapping_folder(tmp_path: Path) -> None:
    make_zip(tmp_path / "asl.zip", {f"archive/{name}": data for name, data in DOUBLED.items()})
    ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "raw") == EXPECTED


def test_folder_source(tmp_path: Path) -> None:
    make_tree(tmp_path / "extracted", DOUBLED)
    report = ingest_source("extracted", tmp_path / "data" / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "data" / "raw") == EXPECTED
    assert (report.train_files, report.test_files, report.source) == (3, 1, str(tmp_path / "extracted"))
    assert files_under(tmp_path / "extracted") == EXPECTED  # the source is copied, not moved


def test_mixed_case_extensions_and_class_names(tmp_path: Path) -> None:
    make_zip(
        tmp_path / "asl.zip",
        {
            "asl_alphabet_train/B/B1.JPG": JPEG,
            "asl_alphabet_train/B/B2.jpeg": JPEG,
            "asl_alphabet_train/b/B3.Jpeg": JPEG,  # class folders match case-insensitively
            "asl_alphabet_train/DEL/d1.PNG": PNG,
            "asl_alphabet_train/Space/s1.png": PNG,
            "asl_alphabet_test/DEL_test.JPG": JPEG,
        },
    )
    report = ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "raw") == {
        f"{TRAIN.as_posix()}/B/B1.JPG",
        f"{TRAIN.as_posix()}/B/B2.jpeg",
        f"{TRAIN.as_posix()}/B/B3.Jpeg",
        f"{TRAIN.as_posix()}/del/d1.PNG",
        f"{TRAIN.as_posix()}/space/s1.png",
        f"{TEST.as_posix()}/del_test.JPG",
    }
    assert (report.train_files, report.test_files, report.ignored) == (5, 1, ())


def test_junk_is_ignored_and_reported(tmp_path: Path) -> None:
    make_zip(
        tmp_path / "asl.zip",
        {
            **DOUBLED,
            "__MACOSX/asl_alphabet_train/._A1.jpg": b"mac",
            "__MACOSX/asl_alphabet_train/._A2.jpg": b"mac",
            "asl_alphabet_train/asl_alphabet_train/A/.DS_Store": b"mac",
            "asl_alphabet_train/asl_alphabet_train/A/._A1.jpg": b"mac",
            "readme.txt": b"hello",
            "asl_alphabet_train/asl_alphabet_train/A/notes.txt": b"hello",
        },
    )
    report = ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "raw") == EXPECTED
    assert set(report.ignored) == {
        "__MACOSX/",  # one entry for the whole tree
        "asl_alphabet_train/asl_alphabet_train/A/.DS_Store",
        "asl_alphabet_train/asl_alphabet_train/A/._A1.jpg",
        "readme.txt",
        "asl_alphabet_train/asl_alphabet_train/A/notes.txt",
    }
    assert report.ignored_count == 5


def test_junk_in_folder_source_is_ignored_and_reported(tmp_path: Path) -> None:
    junk = {"__MACOSX/x/._A1.jpg": b"mac", ".git/config": b"x", "readme.txt": b"x"}
    make_tree(tmp_path / "src", {**DOUBLED, **junk})
    report = ingest_source("src", tmp_path / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "raw") == EXPECTED
    assert set(report.ignored) == {"__MACOSX/", ".git/", "readme.txt"}
    assert report.ignored_count == 3


def test_ignored_list_is_capped_and_counted_in_full(tmp_path: Path) -> None:
    notes = {f"notes/{i}.txt": b"x" for i in range(sources.MAX_REPORTED_IGNORED + 7)}
    make_zip(tmp_path / "asl.zip", {**DOUBLED, **notes})
    report = ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert report.ignored == tuple(notes)[: sources.MAX_REPORTED_IGNORED]
    assert report.ignored_count == sources.MAX_REPORTED_IGNORED + 7


@pytest.mark.parametrize("evil", ["../evil.jpg", "asl_alphabet_train/A/../../../evil.jpg", "..\\evil.jpg"])
def test_zip_member_escaping_with_dotdot_is_refused(tmp_path: Path, evil: str) -> None:
    make_zip(tmp_path / "asl.zip", {**DOUBLED, evil: JPEG})
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "data" / "raw", base_dir=tmp_path)
    assert repr(evil) in assert_one_line(error)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "data" / "evil.jpg").exists()
    assert not (tmp_path / "data" / "raw").exists()  # not created half-written
    assert_nothing_staged(tmp_path / "data")


def test_failed_ingest_keeps_previous_target_intact(tmp_path: Path) -> None:
    make_zip(tmp_path / "good.zip", DOUBLED)
    ingest_source("good.zip", tmp_path / "raw", base_dir=tmp_path)
    make_zip(tmp_path / "bad.zip", {**DOUBLED, "../evil.jpg": JPEG})
    with pytest.raises(UserError):
        ingest_source("bad.zip", tmp_path / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "raw") == EXPECTED
    assert_nothing_staged(tmp_path)


def test_failure_while_writing_cleans_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_zip(tmp_path / "asl.zip", DOUBLED)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_copy_at_most", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert not (tmp_path / "raw").exists()
    assert_nothing_staged(tmp_path)


@pytest.mark.parametrize("evil", ["/tmp/evil.jpg", "C:/evil.jpg", "C:evil.jpg", "\\evil.jpg"])
def test_zip_member_with_absolute_path_is_refused(tmp_path: Path, evil: str) -> None:
    make_zip(tmp_path / "asl.zip", {**DOUBLED, evil: JPEG})
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    message = assert_one_line(error)
    assert repr(evil) in message and "absolute" in message
    assert not (tmp_path / "raw").exists()


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "asl.zip", "w") as archive:
        for name, data in DOUBLED.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("asl_alphabet_train/asl_alphabet_train/A/link.jpg")
        link.create_system = 3  # Unix, so external_attr holds the mode
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    message = assert_one_line(error)
    assert "link.jpg" in message and "symbolic link" in message
    assert not (tmp_path / "raw").exists()


def test_encrypted_member_is_refused(tmp_path: Path) -> None:
    secret = "asl_alphabet_train/asl_alphabet_train/A/secret.jpg"
    data = bytearray(make_zip(tmp_path / "plain.zip", {**DOUBLED, secret: JPEG}).read_bytes())
    # zipfile cannot encrypt, so set the "encrypted" flag in the member's central directory record.
    record = data.rindex(b"PK\x01\x02")  # the last member's record: the secret one
    assert data[record + 46 : record + 46 + len(secret)] == secret.encode()
    data[record + 8] |= 0x1
    (tmp_path / "asl.zip").write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert "encrypted" in assert_one_line(error)
    assert not (tmp_path / "raw").exists()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_symlink_in_folder_source_is_refused(tmp_path: Path, kind: str) -> None:
    make_tree(tmp_path / "src", DOUBLED)
    outside = make_tree(tmp_path / "outside", {"secret.jpg": JPEG})
    if kind == "file":
        os.symlink(outside / "secret.jpg", tmp_path / "src" / TRAIN / "A" / "A9.jpg")
    else:
        os.symlink(outside, tmp_path / "src" / TRAIN / "B")
    with pytest.raises(UserError) as error:
        ingest_source("src", tmp_path / "raw", base_dir=tmp_path)
    assert "symbolic link" in assert_one_line(error)
    assert not (tmp_path / "raw").exists()
    assert_nothing_staged(tmp_path)


def test_symlinked_source_folder_itself_is_allowed(tmp_path: Path) -> None:
    make_tree(tmp_path / "real", DOUBLED)
    os.symlink(tmp_path / "real", tmp_path / "alias")
    ingest_source("alias", tmp_path / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "raw") == EXPECTED


def test_unknown_class_folder_is_refused(tmp_path: Path) -> None:
    make_zip(tmp_path / "asl.zip", {**DOUBLED, "asl_alphabet_train/asl_alphabet_train/AA/x.jpg": JPEG})
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    message = assert_one_line(error)
    assert "'AA'" in message and "A, B, C" in message and "del, nothing, space" in message
    assert not (tmp_path / "raw").exists()


def test_badly_named_test_image_is_refused(tmp_path: Path) -> None:
    make_zip(tmp_path / "asl.zip", {**DOUBLED, "asl_alphabet_test/asl_alphabet_test/photo.jpg": JPEG})
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert "photo.jpg" in assert_one_line(error)


@pytest.mark.parametrize(
    "members",
    [
        {"A/A1.jpg": JPEG, "B/B1.jpg": JPEG},  # class folders at the top: no asl_alphabet_train
        {"readme.txt": b"x"},  # no images at all
        {"asl_alphabet_test/A_test.jpg": JPEG},  # test images only
        {"a/b/asl_alphabet_train/A/A1.jpg": JPEG},  # wrapped twice
    ],
)
def test_wrong_layout_explains_the_expected_one(tmp_path: Path, members: dict[str, bytes]) -> None:
    make_zip(tmp_path / "asl.zip", members)
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    message = assert_one_line(error)
    assert "asl_alphabet_train" in message and "data.source" in message and "extracted folder" in message
    assert not (tmp_path / "raw").exists()


def test_empty_folder_source_explains_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as error:
        ingest_source("empty", tmp_path / "raw", base_dir=tmp_path)
    assert "asl_alphabet_train" in assert_one_line(error)


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        ingest_source("downloads/asl.zip", tmp_path / "raw", base_dir=tmp_path)
    message = assert_one_line(error)
    assert "'downloads/asl.zip'" in message and sources.KAGGLE_URL in message
    assert "kaggle" in message and "synthetic" in message


def test_file_that_is_not_a_zip_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "asl.tar").write_bytes(b"x")
    (tmp_path / "broken.zip").write_bytes(b"not a zip at all")
    for name in ("asl.tar", "broken.zip"):
        with pytest.raises(UserError) as error:
            ingest_source(name, tmp_path / "raw", base_dir=tmp_path)
        assert name in assert_one_line(error)


def test_source_overlapping_target_is_refused(tmp_path: Path) -> None:
    make_zip(tmp_path / "raw.zip", DOUBLED)
    ingest_source("raw.zip", tmp_path / "data" / "raw", base_dir=tmp_path)
    (tmp_path / "raw.zip").rename(tmp_path / "data" / "raw" / "asl.zip")  # would be deleted by the swap
    for source in ("data/raw/asl.zip", "data/raw", "data", "."):
        with pytest.raises(UserError) as error:
            ingest_source(source, tmp_path / "data" / "raw", base_dir=tmp_path)
        assert "overlaps" in assert_one_line(error)
    assert (tmp_path / "data" / "raw" / "asl.zip").exists()


def test_reingest_replaces_old_target(tmp_path: Path) -> None:
    make_zip(tmp_path / "asl.zip", DOUBLED)
    target = tmp_path / "raw"
    make_tree(target, {f"{TRAIN.as_posix()}/Z/stale.jpg": JPEG, "stale.txt": b"old"})
    make_tree(tmp_path / "raw.tmp-leftover", {"x": b"killed run"})  # from an ingest that was killed
    ingest_source("asl.zip", target, base_dir=tmp_path)
    assert files_under(target) == EXPECTED
    assert_nothing_staged(tmp_path)


def test_synthetic_is_not_handled_here(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ingest_source("synthetic", tmp_path / "raw", base_dir=tmp_path)


REMEDIES = (
    "KAGGLE_USERNAME",
    "KAGGLE_KEY",
    "~/.kaggle/kaggle.json",
    sources.KAGGLE_URL,
    "data.source",
    "params.yaml",
)


def test_kaggle_download_failure_gives_both_remedies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> Path:
        raise ConnectionError("Failed to resolve 'www.kaggle.com'\n[Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "_download_kaggle", offline)
    with pytest.raises(UserError) as error:
        ingest_source("kaggle", tmp_path / "raw", base_dir=tmp_path)
    message = assert_one_line(error)
    assert all(remedy in message for remedy in REMEDIES)
    assert "Name or service not known" in message  # the cause is kept, on the same line


def test_kaggle_download_is_ingested_like_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloaded = make_tree(tmp_path / "cache" / "versions" / "1", DOUBLED)
    monkeypatch.setattr(sources, "_download_kaggle", lambda: downloaded)
    report = ingest_source("kaggle", tmp_path / "raw", base_dir=tmp_path)
    assert files_under(tmp_path / "raw") == EXPECTED
    assert report.source == "kaggle:grassknoted/asl-alphabet"


def test_real_kagglehub_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real kagglehub, pointed at a closed local port: fails at once even on a machine with network."""
    pytest.importorskip("kagglehub")
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub-cache"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")  # kagglesdk: localhost:7777, never the real site
    monkeypatch.setenv("DISABLE_KAGGLE_CACHE", "1")
    monkeypatch.setenv("DISABLE_COLAB_CACHE", "1")
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        ingest_source("kaggle", tmp_path / "raw", base_dir=tmp_path)
    assert time.monotonic() - started < 30
    assert all(remedy in assert_one_line(error) for remedy in REMEDIES)
    assert not (tmp_path / "raw").exists()


def test_destination_outside_staging_is_refused_even_if_planning_slipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: a computed destination that resolves outside the staging folder."""
    make_zip(tmp_path / "asl.zip", DOUBLED)
    escaping = ("asl_alphabet_train", "..", "..")
    monkeypatch.setattr(sources, "_canonical_parts", lambda parts, member: (*escaping, parts[-1]))
    with pytest.raises(UserError) as error:
        ingest_source("asl.zip", tmp_path / "raw", base_dir=tmp_path)
    assert "outside" in assert_one_line(error)
    assert files_under(tmp_path) == {"asl.zip"}


# ---------------------------------------------------------------- zip bombs and other oversized sources


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """A target holding an earlier good ingest, which a refused ingest must leave as it was."""
    make_zip(tmp_path / "good.zip", DOUBLED)
    ingest_source("good.zip", tmp_path / "raw", base_dir=tmp_path)
    return tmp_path / "raw"


def refusal(source: str, target: Path) -> str:
    """The one-line refusal of ingesting `source` over `target`, checked to have left `target` alone."""
    with pytest.raises(UserError) as error:
        ingest_source(source, target, base_dir=target.parent)
    assert files_under(target) == EXPECTED
    assert_nothing_staged(target.parent)
    return assert_one_line(error)


BIG = "asl_alphabet_train/asl_alphabet_train/B/B1.jpg"


def test_zip_member_over_the_file_limit_is_refused(
    tmp_path: Path, previous: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_zip(tmp_path / "asl.zip", {**DOUBLED, BIG: os.urandom(2000)})
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1000)  # so the archive can stay tiny
    message = refusal("asl.zip", previous)
    assert f"zip member {BIG!r} declares 2000 bytes, over the limit of 1000 bytes per file" in message


def test_zip_over_the_total_limit_is_refused(
    tmp_path: Path, previous: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_zip(tmp_path / "asl.zip", {**DOUBLED, BIG: os.urandom(5000)})
    monkeypatch.setattr(sources, "MAX_TOTAL_BYTES", 5000)  # DOUBLED alone stays under it, BIG takes it over
    message = refusal("asl.zip", previous)
    assert repr(BIG) in message and "over the limit of 5000 bytes for all images" in message


def test_zip_bomb_is_refused_by_its_ratio(tmp_path: Path, previous: Path) -> None:
    zeros = bytes(sources.RATIO_CHECKED_ABOVE + 1)  # deflates about 1000:1; the real limits apply
    make_zip(tmp_path / "asl.zip", {**DOUBLED, BIG: zeros}, zipfile.ZIP_DEFLATED)
    message = refusal("asl.zip", previous)
    assert f"zip member {BIG!r} declares {len(zeros)} bytes" in message
    assert f"over the limit of {sources.MAX_RATIO}:1" in message


def test_zip_member_inflating_past_its_forged_size_is_stopped(tmp_path: Path, previous: Path) -> None:
    """Both headers say 1000 bytes, the data inflate to 50 KB: stopped by counting while writing,
    not by the checks made before (which the forged size passes), nor by zipfile's CRC check."""
    honest = make_zip(tmp_path / "honest.zip", {**DOUBLED, BIG: os.urandom(50_000)}, zipfile.ZIP_DEFLATED)
    data = bytearray(honest.read_bytes())
    central, local = data.rindex(b"PK\x01\x02"), data.rindex(b"PK\x03\x04")  # BIG is the last member
    assert data[central + 46 : central + 46 + len(BIG)] == BIG.encode()
    struct.pack_into("<I", data, central + 24, 1000)  # uncompressed size in the central directory
    struct.pack_into("<I", data, local + 22, 1000)  # and in the local header
    (tmp_path / "asl.zip").write_bytes(bytes(data))
    message = refusal("asl.zip", previous)
    assert f"zip member {BIG!r} declares 1000 bytes, but inflates to more" in message


def test_folder_file_growing_after_the_scan_is_stopped(
    tmp_path: Path, previous: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path / "src", DOUBLED)
    grows = tmp_path / "src" / TRAIN / "A" / "A1.jpg"
    checked = sources._check_sizes

    def check_then_grow(*args: Any) -> None:  # something still writing to the source folder
        checked(*args)
        with grows.open("ab") as out:
            out.write(b"x" * 100)

    monkeypatch.setattr(sources, "_check_sizes", check_then_grow)
    message = refusal("src", previous)
    assert f"'{TRAIN.as_posix()}/A/A1.jpg'" in message and f"grew past its {len(JPEG)} bytes" in message


def test_folder_file_over_the_file_limit_is_refused(
    tmp_path: Path, previous: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path / "src", {**DOUBLED, BIG: os.urandom(2000)})
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1000)
    message = refusal("src", previous)
    assert f"file {BIG!r} in the source folder has 2000 bytes, over the limit of 1000 bytes" in message


def test_source_larger_than_the_free_space_is_refused(
    tmp_path: Path, previous: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_zip(tmp_path / "asl.zip", DOUBLED)
    full = shutil.disk_usage(tmp_path)._replace(free=sources.FREE_SPACE_MARGIN)  # none above the margin
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: full)
    message = refusal("asl.zip", previous)
    assert f"only {sources.FREE_SPACE_MARGIN} bytes are free" in message and "free up space" in message


# ---------------------------------------------------------------- the fetch stage names what it ignored


def test_fetch_names_ignored_files_in_its_run_and_output(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow  # slow to import: only this test needs it

    junk = {"asl_alphabet_train/README.txt": b"read me", f"{TRAIN.as_posix()}/A/.DS_Store": b"mac"}
    make_zip(tmp_path / "asl.zip", {**DOUBLED, **junk})
    params = params_from_dict(deep_merge(TINY_PARAMS, {"data": {"source": "asl.zip", "external_test": None}}))
    counts = run_fetch(params, Paths(tmp_path))
    assert counts["ignored_files"] == 2
    [run] = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")
    logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{IGNORED_ARTIFACT}")
    assert logged == {"ignored": list(junk), "count": 2}
    assert run.data.metrics["ignored_files"] == 2
    printed = capsys.readouterr().out
    assert "ignored 2 files" in printed and all(name in printed for name in junk)


# ---------------------------------------------------------------- the external test set

# Kaggle's danrasband/asl-alphabet-test: one wrapping folder, class folders (letters in capitals).
EXTERNAL = {
    "asl-alphabet-test/A/A0001_test.jpg": JPEG,
    "asl-alphabet-test/A/A0002_test.jpg": JPEG,
    "asl-alphabet-test/DEL/del0001_test.jpg": PNG,
    "asl-alphabet-test/space/space0001_test.jpg": JPEG,
    "asl-alphabet-test/README.txt": b"other signers",
}
EXTERNAL_EXPECTED = {
    "A/A0001_test.jpg",
    "A/A0002_test.jpg",
    "del/del0001_test.jpg",
    "space/space0001_test.jpg",
}


@pytest.mark.parametrize("packed", [False, True])
def test_external_set_from_a_folder_or_zip_lands_in_class_folders(tmp_path: Path, packed: bool) -> None:
    source = make_zip(tmp_path / "ext.zip", EXTERNAL) if packed else make_tree(tmp_path / "ext", EXTERNAL)
    report = ingest_external(source.name, tmp_path / "data" / "external", base_dir=tmp_path)
    assert files_under(tmp_path / "data" / "external") == EXTERNAL_EXPECTED
    assert (report.train_files, report.test_files, report.ignored) == (
        0,
        4,
        ("asl-alphabet-test/README.txt",),
    )
    assert_nothing_staged(tmp_path / "data")


def test_external_set_goes_through_the_same_archive_checks(tmp_path: Path) -> None:
    make_zip(tmp_path / "evil.zip", {"../A/x.jpg": JPEG})
    with pytest.raises(UserError, match="outside the archive"):
        ingest_external("evil.zip", tmp_path / "external", base_dir=tmp_path)
    make_zip(tmp_path / "odd.zip", {"asl-alphabet-test/Hello/x.jpg": JPEG})
    with pytest.raises(UserError) as error:
        ingest_external("odd.zip", tmp_path / "external", base_dir=tmp_path)
    assert "unknown class folder 'Hello'" in assert_one_line(error) and "data.external_test" in str(
        error.value
    )
    make_zip(tmp_path / "empty.zip", {"notes/readme.txt": b"no images"})
    with pytest.raises(UserError, match="no images found") as error:
        ingest_external("empty.zip", tmp_path / "external", base_dir=tmp_path)
    with pytest.raises(UserError, match="data.external_test path 'missing.zip' does not exist"):
        ingest_external("missing.zip", tmp_path / "external", base_dir=tmp_path)
    assert not (tmp_path / "external").exists()


def test_external_kaggle_download_is_the_other_signers_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def download(dataset: str = sources.KAGGLE_DATASET) -> Path:
        asked.append(dataset)
        return make_tree(tmp_path / "cache" / dataset, EXTERNAL)

    monkeypatch.setattr(sources, "_download_kaggle", download)
    report = ingest_external("kaggle", tmp_path / "external", base_dir=tmp_path)
    assert (
        asked == ["danrasband/asl-alphabet-test"] and report.source == "kaggle:danrasband/asl-alphabet-test"
    )
    assert files_under(tmp_path / "external") == EXTERNAL_EXPECTED

    def offline(dataset: str = sources.KAGGLE_DATASET) -> Path:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(sources, "_download_kaggle", offline)
    with pytest.raises(UserError) as error:
        ingest_external("kaggle", tmp_path / "external2", base_dir=tmp_path)
    message = assert_one_line(error)
    assert (
        "danrasband/asl-alphabet-test" in message
        and "data.external_test" in message
        and "KAGGLE_KEY" in message
    )


def test_fetch_writes_the_external_set_or_says_there_is_none(tmp_path: Path, mlflow_store: str) -> None:
    from pipeline.fetch import EXTERNAL_SOURCE_FILE

    make_zip(tmp_path / "asl.zip", DOUBLED)
    make_tree(tmp_path / "ext", EXTERNAL)
    paths = Paths(tmp_path)
    params = params_from_dict(
        deep_merge(TINY_PARAMS, {"data": {"source": "asl.zip", "external_test": "ext"}})
    )
    assert run_fetch(params, paths)["external_files"] == 4
    assert files_under(paths.raw_external) == EXTERNAL_EXPECTED | {EXTERNAL_SOURCE_FILE}
    params = params_from_dict(deep_merge(TINY_PARAMS, {"data": {"source": "asl.zip", "external_test": None}}))
    assert run_fetch(params, paths)["external_files"] == 0
    assert files_under(paths.raw_external) == {EXTERNAL_SOURCE_FILE}, (
        "DVC's output exists, and holds no image"
    )
