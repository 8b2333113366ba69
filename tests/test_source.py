"""Listing the input: which files are work items, in which order; an input that cannot be listed is refused."""

import os

import pytest

from pipeline.plan import new_plan
from pipeline.runfolder import RunFolder
from pipeline.source import InputError, LocalFolder
from tests.conftest import write_image


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
            f.write(b"\xff\xd8\xff")

    listing = _list(tmp_path)

    expected = ["caf\\xe9.jpg", "latin-\\xe9/a.png", "sub dir/ok.webp", "with space.jpg", "ünïcödé 写真.png"]
    assert listing.paths == expected
    assert listing.escaped == [True, True, False, False, False]
    plan = new_plan(listing, 2, {})
    out = tmp_path.parent / "out"
    out.mkdir()
    assert RunFolder(out).open_plan(lambda: plan) == (plan, True)
    loaded = RunFolder(out).load_plan()
    assert loaded.paths.to_pylist() == expected and loaded.escaped.to_pylist() == listing.escaped


def test_an_unreadable_folder_is_refused_with_the_fix(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):  # this machine runs tests as root, for whom chmod 000 locks nothing
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"cannot list folder .*locked \(Permission denied\): make it readable"):
        _list(tmp_path)
