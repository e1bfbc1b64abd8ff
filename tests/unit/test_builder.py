from __future__ import annotations

import gzip
import subprocess

from kvmsnap_demo.builder import CpioWriter


def test_cpio_archive_lists_with_gnu_cpio(tmp_path):
    archive = CpioWriter()
    archive.add("dir", 0o040755)
    archive.add("dir/file", 0o100644, b"hello")
    archive.add("dev-console", 0o020600, rdev=(5, 1))
    data = gzip.compress(archive.finish())
    listing = subprocess.run(["cpio", "-itv"], input=gzip.decompress(data),
                             capture_output=True, check=True).stdout.decode()
    assert "dir/file" in listing
    assert "5,   1" in listing or "5, 1" in listing  # a character device 5:1
    out = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "dir/file"],
                         input=gzip.decompress(data), capture_output=True, check=True)
    assert out.stdout == b"hello"
