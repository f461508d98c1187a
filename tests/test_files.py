"""quantkit.files: output checks and publishing by rename (never a partial file, nothing left behind)."""
from __future__ import annotations

import shutil

import pytest

from quantkit.errors import ExportError
from quantkit.files import (OutputExistsError, atomic_write_bytes, check_output_path, new_file_mode, publish_file,
                            publish_together, temporary_folder_beside)


def test_atomic_write_replaces_and_uses_umask_mode(tmp_path):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == new_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def test_publish_without_replace_keeps_an_existing_file(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"theirs")
    with pytest.raises(OutputExistsError, match="m.pt"):
        publish_file(target, lambda tmp: tmp.write_bytes(b"ours"), replace=False)
    assert target.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    def write(tmp):
        tmp.write_bytes(b"ours")
        return "written"

    fresh = tmp_path / "fresh.pt"
    assert publish_file(fresh, write, replace=False) == "written"
    assert fresh.read_bytes() == b"ours"


def test_failed_write_leaves_nothing_and_names_the_file(tmp_path):
    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(ExportError, match=r"cannot write .*out\.onnx.*No space left"):
        publish_file(tmp_path / "out.onnx", fail)
    assert list(tmp_path.iterdir()) == []


def test_check_output_path_names_the_problem(tmp_path):
    with pytest.raises(ExportError, match="is a folder"):
        check_output_path(tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "m.onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "m.onnx")
    assert check_output_path(tmp_path / "m.onnx") == tmp_path / "m.onnx"


def test_publish_together_restores_the_previous_files_when_a_rename_fails(tmp_path):
    xml, bin_ = tmp_path / "m.xml", tmp_path / "m.bin"
    xml.write_text("old xml")
    bin_.write_text("old bin")
    scratch = temporary_folder_beside(xml)
    new_bin = scratch / "model.bin"
    new_bin.write_text("new bin")
    missing_xml = scratch / "model.xml"  # never written: its rename fails after the .bin was replaced
    with pytest.raises(FileNotFoundError):
        publish_together([(new_bin, bin_), (missing_xml, xml)], scratch)
    assert (bin_.read_text(), xml.read_text()) == ("old bin", "old xml")
    missing_xml.write_text("new xml")
    new_bin.write_text("new bin")
    publish_together([(new_bin, bin_), (missing_xml, xml)], scratch)
    assert (bin_.read_text(), xml.read_text()) == ("new bin", "new xml")
    shutil.rmtree(scratch)
