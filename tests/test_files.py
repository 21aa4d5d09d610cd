"""files.remove: what it removes, and what it never touches."""

from __future__ import annotations

from pathlib import Path

from jobd.files import remove


def test_remove_empty_dir_file_tree_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    single = tmp_path / "file"
    single.write_text("x")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("y")
    (tree / "g").write_text("z")
    remove(empty, single, tree, tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_remove_never_follows_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(outside)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "escape").symlink_to(outside)
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    remove(link, tree)
    assert not link.exists() and not link.is_symlink()
    assert not tree.exists()
    assert (outside / "keep").read_text() == "keep"
