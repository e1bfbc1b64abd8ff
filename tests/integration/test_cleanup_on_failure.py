"""Fixtures clean up after a test that fails while its VM runs."""

from __future__ import annotations

from kvmsnap_demo.testing import leftovers
from kvmsnap_plugin.host import process

pytest_plugins = ["pytester"]

FAILING_TEST = '''
def test_fails_with_a_running_vm(start_demo):
    vm = start_demo()
    vm.wait_counter(3)
    assert False, "deliberate failure with a running VM"
'''


def test_a_failing_test_leaves_no_qemu_or_files(pytester, demo_guest):
    pytester.makeconftest('pytest_plugins = ["kvmsnap_demo.testing"]')
    pytester.makeini("[pytest]\ntmp_path_retention_policy = none\n")
    pytester.makepyfile(FAILING_TEST)
    before = len(process.SPAWNED_PIDS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    spawned = process.SPAWNED_PIDS[before:]
    assert spawned, "the inner test started no QEMU"
    assert leftovers(spawned) == []
    basetemp = pytester.path.parent / "basetemp"  # where the inner run kept its tmp_path
    files = [p for p in basetemp.rglob("*") if p.is_file()] if basetemp.exists() else []
    assert files == []
