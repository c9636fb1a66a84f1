"""save_state / load_state: an equal VM back, and a replay that continues where it stopped."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from sppjit import VM, InputError
from sppjit.datasets.scenarios import make
from sppjit.kernels import layout as L
from sppjit.savestate import load_state, save_state, state_arrays


def assert_equal_vms(a, b) -> None:
    assert a.config == b.config
    left, right = state_arrays(a), state_arrays(b)
    assert left.keys() == right.keys() == set(L.State._fields) - {"write_view"}  # derived: not saved
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


@pytest.fixture(scope="module")
def scenario():
    return make("guarded", 4000, seed=11)


def halves(scenario):
    columns = scenario.columns()
    n = len(scenario) // 2
    return ({k: v[:n] for k, v in columns.items()}, {k: v[n:] for k, v in columns.items()})


def protected_vm(scenario) -> VM:
    vm = VM(memory=scenario.memory, vcpus=scenario.vcpus)
    vm.protect(scenario.protect_gfn, scenario.protect_access)
    return vm


def test_round_trip_fresh_vm(tmp_path):
    vm = VM(memory="64MiB", vcpus=3, subpage_check="first", granularity="page",
            memslots=[(0, 1024), (4096, 512)])
    save_state(vm, tmp_path / "fresh.npz")
    assert_equal_vms(vm, load_state(tmp_path / "fresh.npz"))


def test_round_trip_after_replay(tmp_path, scenario):
    vm = protected_vm(scenario)
    first, _ = halves(scenario)
    vm.replay(first)
    path = tmp_path / "state"  # no extension: written exactly under this name
    save_state(vm, path)
    assert os.listdir(tmp_path) == ["state"]
    loaded = load_state(path)
    assert_equal_vms(vm, loaded)
    # The pool keeps spare room (capacity may differ), but only the used part is saved.
    used = int(vm.state.scal[L.SC_NTABLES])
    with np.load(path) as data:
        assert data["tables"].shape == (used, 512)
    assert loaded.state.tables.shape[0] >= used
    assert loaded.state.tables.flags.writeable


def test_replay_continues_on_a_loaded_state(tmp_path, scenario):
    first, second = halves(scenario)
    original = protected_vm(scenario)
    original.replay(first)
    save_state(original, tmp_path / "s.npz")
    loaded = load_state(tmp_path / "s.npz")

    on_original = original.replay(second)
    on_loaded = loaded.replay(second)
    assert on_original.table.equals(on_loaded.table)
    assert on_original.exits.equals(on_loaded.exits)
    drop = ("seconds", "compile_seconds", "accesses_per_second")
    assert ({k: v for k, v in on_original.summary.items() if k not in drop}
            == {k: v for k, v in on_loaded.summary.items() if k not in drop})
    assert_equal_vms(original, loaded)
    # And the continuation differs from a replay on a fresh VM (pages stay mapped).
    fresh = protected_vm(scenario).replay(second)
    assert fresh.summary["exits"]["ept_fault"] > on_loaded.summary["exits"]["ept_fault"]


def test_reference_engine_continues_too(tmp_path):
    vm = VM(memory="16MiB")
    vm.protect([3], [0xFFFF0000])
    vm.replay({"gpa": np.array([0x3000, 0x3800], dtype=np.uint64)}, engine="reference")
    save_state(vm, tmp_path / "s.npz")
    loaded = load_state(tmp_path / "s.npz")
    trace = {"gpa": np.array([0x3010, 0x3810, 0x4000], dtype=np.uint64)}
    a = vm.replay(trace, engine="reference")
    b = loaded.replay(trace, engine="reference")
    assert a.table.equals(b.table) and a.exits.equals(b.exits)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_state(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(InputError, match="not an sppjit state file"):
        load_state(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    with pytest.raises(InputError, match="not an sppjit state file"):
        load_state(tmp_path / "other.npz")
    vm = VM(memory="16MiB")
    save_state(vm, tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="state"):
        load_state(tmp_path / "cut.npz")
    # An array of the wrong shape for the config is refused, not loaded.
    with np.load(tmp_path / "good.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["vmcs"] = np.zeros((2, arrays["vmcs"].shape[1]), dtype=arrays["vmcs"].dtype)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(InputError, match="vmcs"):
        load_state(tmp_path / "shape.npz")
    assert zipfile.is_zipfile(tmp_path / "good.npz")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    vm = VM(memory="16MiB")

    def broken(handle, **arrays):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError):
        save_state(vm, tmp_path / "s.npz")
    assert os.listdir(tmp_path) == []
