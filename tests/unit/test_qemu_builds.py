"""The QEMU 10 prefix: missing means a failure that names its fix; present means no download."""

from __future__ import annotations

import pytest

from kvmsnap_demo import qemu_builds
from kvmsnap_plugin.errors import HostError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "kvmsnap"


def test_a_missing_prefix_fails_and_says_what_provisions_it(empty_cache, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(HostError, match="not provisioned") as caught:
        qemu_builds.qemu_build(qemu_builds.QEMU10)
    assert "make test" in caught.value.hint


def test_an_unfinished_prefix_is_not_used(empty_cache):
    qemu_builds.wrapper().parent.mkdir(parents=True)
    qemu_builds.wrapper().write_text("#!/bin/sh\n")  # no stamp: the download was interrupted
    with pytest.raises(HostError, match="not provisioned"):
        qemu_builds.qemu_build(qemu_builds.QEMU10)


def test_a_finished_prefix_is_not_downloaded_again(empty_cache, monkeypatch):
    qemu_builds.prefix().mkdir(parents=True)
    qemu_builds.stamp().write_text("10.0.2\n")

    def no_download(*args):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(qemu_builds, "_download", no_download)
    monkeypatch.setattr(qemu_builds, "qemu_build", lambda name: name)
    assert qemu_builds.provision_qemu10() == qemu_builds.QEMU10


def test_the_wrapper_execs_the_prefix_binary_with_its_modules_and_firmware(tmp_path):
    root = tmp_path / "odd dir"
    root.mkdir()
    qemu_builds._write_wrapper(root)
    script = qemu_builds.wrapper(root).read_text()
    assert f"QEMU_MODULE_DIR='{root}/usr/lib/x86_64-linux-gnu/qemu'" in script
    assert f"exec '{root}/usr/bin/qemu-system-x86_64' -L '{root}/usr/share/qemu' " \
           f"-L '{root}/usr/share/seabios' \"$@\"" in script
    assert qemu_builds.wrapper(root).stat().st_mode & 0o777 == 0o755
