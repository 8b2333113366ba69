"""Listing the input: which files are work items, in which order; an input that cannot be listed is refused."""

import os
import socket

import pytest

from pipeline.plan import new_plan
from pipeline.runfolder import RunFolder
from pipeline.source import InputError, LocalFolder, decode_path, encode_path
from tests.conftest import write_image
from tests.test_hostile import deep_folder


def _list(folder):
    return LocalFolder(folder).list()


def test_lists_every_image_recursively_sorted_and_counts_the_rest(tmp_path):
    for name in ["b/2.JPG", "a/1.jpeg", "a/z/3.PNG", "c.webp", "d.bmp", "e.gif", "f.tif", "g.TIFF"]:
        write_image(tmp_path / name, 0)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a" / "data.csv").write_text("x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image name is not an image
    os.symlink(tmp_path / "c.webp", tmp_path / "link.webp")

    listing = _list(tmp_path)

    assert listing.paths == ["a/1.jpeg", "a/z/3.PNG", "b/2.JPG", "c.webp", "d.bmp", "e.gif", "f.tif", "g.TIFF",
                             "link.webp"]
    assert listing.ignored == 2


def test_missing_input_empty_input_and_file_input_are_refused_with_the_fix(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        _list(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"found 0 images .*1 other files ignored.*\.jpg"):
        _list(tmp_path)
    with pytest.raises(InputError, match="is not a folder"):
        _list(tmp_path / "readme.txt")


def test_names_with_spaces_non_ascii_and_invalid_utf8_all_become_work_items(tmp_path):
    write_image(tmp_path / "with space.jpg", 0)
    write_image(tmp_path / "ünïcödé 写真.png", 1)
    (tmp_path / "sub dir").mkdir()
    write_image(tmp_path / "sub dir" / "ok.webp", 2)
    os.mkdir(os.fsencode(tmp_path) + b"/latin-\xe9")
    for raw in (b"caf\xe9.jpg", b"latin-\xe9/a.png"):  # Latin-1 bytes: not UTF-8
        with open(os.fsencode(tmp_path) + b"/" + raw, "wb") as f:
            f.write(raw)

    listing = _list(tmp_path)

    expected = ["caf\\xe9.jpg", "latin-\\xe9/a.png", "sub dir/ok.webp", "with space.jpg", "ünïcödé 写真.png"]
    assert listing.paths == expected
    for path, raw in zip(expected, (b"caf\xe9.jpg", b"latin-\xe9/a.png"), strict=False):
        with LocalFolder(tmp_path).open(path) as file:
            assert file.read() == raw, "the path opens the file it names"
    plan = new_plan(listing, 2, {})
    out = tmp_path.parent / "out"
    out.mkdir()
    assert RunFolder(out).open_plan(lambda: plan) == (plan, True)
    assert RunFolder(out).load_plan().paths.to_pylist() == expected


NAMES = [b"\xff\xfe.jpg", b"\\xff\\xfe.jpg", b"\\.jpg", b"a\\\\b.png", b"\\x4.gif", b"\\\xe9.bmp",
         "é€.tif".encode(), b"\xed\xa0\x80.png", b"x\\xzz.webp"]


def test_every_name_has_one_path_that_opens_it(tmp_path):
    """Backslashes are doubled and bytes that are not UTF-8 written \\xNN: a raw b'\\xff' and a name spelt
    '\\xff' get two paths, each opening its own file; plain UTF-8 names keep their spelling."""
    for name in NAMES:
        with open(os.fsencode(tmp_path) + b"/" + name, "wb") as f:
            f.write(name)

    paths = _list(tmp_path).paths

    assert len(set(paths)) == len(NAMES)
    assert "\\xff\\xfe.jpg" in paths and "\\\\xff\\\\xfe.jpg" in paths and "é€.tif" in paths
    for path in paths:
        path.encode("utf-8")  # valid UTF-8: a Parquet string
        assert encode_path(decode_path(path)) == path
        with LocalFolder(tmp_path).open(path) as file:
            assert os.fsencode(decode_path(path)) == file.read()


def test_symlinked_folders_are_followed_once_each(tmp_path):
    """A symlinked folder is listed; a loop, or a second way to a folder already listed, is not listed again (a
    folder inside INPUT under its real path, one outside under its first link by name)."""
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    for name in ["a/1.jpg", "b/2.png"]:
        write_image(root / name, 0, size=(8, 8))
    for name in ["3.jpg", "sub/4.jpg"]:
        write_image(elsewhere / name, 0, size=(8, 8))
    os.symlink("../elsewhere", root / "more")
    os.symlink("../elsewhere", root / "more-again")
    os.symlink("../b", root / "a" / "also-b")  # inside INPUT: b is listed as b
    os.symlink("..", root / "a" / "up")  # a loop
    os.symlink("../../in", elsewhere / "sub" / "back")  # a loop through the outside folder

    listing = _list(root)

    assert listing.paths == ["a/1.jpg", "b/2.png", "more/3.jpg", "more/sub/4.jpg"]
    assert listing.ignored == 0 and listing.unlisted == {}


def test_image_named_fifos_sockets_and_devices_are_items(tmp_path):
    write_image(tmp_path / "a.png", 0, size=(8, 8))
    os.mkfifo(tmp_path / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "socket.png"))
    os.symlink("/dev/null", tmp_path / "null.gif")
    os.mkfifo(tmp_path / "fifo.txt")  # not image-named: ignored

    listing = _list(tmp_path)

    server.close()
    assert listing.paths == ["a.png", "fifo.jpg", "null.gif", "socket.png"] and listing.ignored == 1


def test_a_folder_that_vanishes_while_listed_is_counted_and_listing_goes_on(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png", 0)
    write_image(tmp_path / "upload_00067" / "b.png", 1)
    real_scandir = os.scandir

    def scandir(path):  # the folder is really renamed between its parent's listing and its own
        if str(path).endswith("upload_00067"):
            os.rename(path, tmp_path.parent / "moved")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = _list(tmp_path)

    assert listing.paths == ["a.png"]
    assert listing.unlisted == {"folder vanished": 1}
    assert listing.unlisted_paths == [{"path": "upload_00067", "error": "folder vanished: No such file or directory"}]


def test_a_path_longer_than_the_system_allows_is_counted_and_listing_goes_on(tmp_path):
    write_image(tmp_path / "a.png", 0)
    deep = deep_folder(tmp_path, "deep")

    listing = _list(tmp_path)

    assert listing.paths == ["a.png"]
    assert listing.unlisted == {"path too long": 1}
    assert listing.unlisted_paths[0]["path"] == deep and listing.unlisted_paths[0]["error"].startswith(
        "path too long: File name too long")


def test_an_unreadable_input_is_refused_with_the_fix(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png", 0)
    real_scandir = os.scandir

    def scandir(path):  # this machine runs tests as root, for whom chmod 000 locks nothing
        if str(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"cannot list input folder .* \(Permission denied\): make it readable"):
        _list(tmp_path)
