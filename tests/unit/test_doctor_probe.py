"""`kvmsnap doctor` on a host with no test guest: it probes KVM with the host's kernel."""

from __future__ import annotations

from kvmsnap_plugin.host import doctor, probes


def test_without_a_cached_probe_the_hosts_kernel_is_booted_and_the_answer_kept(
        monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KVMSNAP_ACCEL", raising=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    monkeypatch.setattr(doctor, "host_kernel", lambda: kernel)
    booted = []

    def fake_probe(image, initrd, timeout=probes.PROBE_TIMEOUT, **kwargs):
        booted.append((image, initrd, kwargs["booted"]))
        return False, "a guest under KVM did not boot within 20 s (nested KVM?)"

    monkeypatch.setattr(probes, "kvm_usable", fake_probe)
    check = doctor.check_accelerator()
    assert booted == [(kernel, None, doctor.KERNEL_BOOTED)]  # no demo guest, no initrd
    assert check.status == "warn" and check.detail.startswith("tcg: a guest under KVM")
    again = doctor.check_accelerator()  # cached until reboot: not booted twice
    assert len(booted) == 1 and again.detail.startswith("tcg:")


def test_without_a_kernel_to_boot_it_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KVMSNAP_ACCEL", raising=False)
    monkeypatch.setattr(doctor, "host_kernel", lambda: None)
    check = doctor.check_accelerator()
    assert check.status == "warn" and check.detail.startswith("not probed")
    assert "make guest" not in check.fix  # nothing of the checkout's demo guest


def test_the_hook_scripts_are_found(monkeypatch):
    check = doctor.check_hooks()
    assert check.status == "ok", check
    assert "kvmsnap-borgmatic-before" in check.detail
    assert (doctor.share_dir() / "hooks" / "kvmsnap-borgmatic-after").is_file()
