"""Seeded mutations of real saved states through load_state and replays (both engines).

Run as a script by tests/test_statecheck.py, in a child process, so that a crash of compiled
code (a signal) fails the test instead of the test run:

    python tests/state_fuzz.py SEED COUNT DIR

It saves a few real states (v4 and v12, SPP on, huge pages, MMIO, several vCPUs), then for each
of COUNT mutations writes a damaged copy, loads it and, when load_state accepts it, replays a
short trace on it with the JIT and the reference engine. Every outcome but a crash is fine as
long as it is a clean one: load_state's InputError, or an error the replay documents (a failed
VM entry, a livelock of a hand-made state). Anything else is printed and exits 3. Each
mutation's number is printed before it runs: the last line tells which one crashed.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np


def base_states(directory: str) -> list[tuple[str, dict]]:
    import sppjit
    from sppjit.savestate import save_state

    out = []
    for i, kw in enumerate((dict(profile="v4", vcpus=2, hugepages=True),
                            dict(profile="v12", vcpus=2, hugepages=True),
                            dict(profile="v4", vcpus=1, granularity="page"))):
        vm = sppjit.VM(memslots=[(0, 4096), (8192, 1024)], **kw)
        vm.init_spp()
        gfns = np.array([0x10, 0x11, 0x200, 0x201, 0x7FF, 8192 + 5, 8192 + 600], dtype=np.uint64)
        vm.protect(gfns, np.array([0, 0xFFFF0000, 0x0F0F0F0F, 1, 0xFFFF, 0x12345678, 0xF0F0], np.uint32))
        vm.replay(trace())
        path = os.path.join(directory, f"base{i}.npz")
        save_state(vm, path)
        with np.load(path, allow_pickle=False) as data:
            out.append((path, {name: data[name].copy() for name in data.files}))
    return out


def trace() -> dict:
    rng = np.random.default_rng(7)
    hot = np.array([0x10, 0x11, 0x200, 0x201, 0x7FF, 0x300, 8192 + 5, 8192 + 600, 5000, 1 << 20], dtype=np.uint64)
    gfn = np.concatenate([hot, rng.choice(hot, 150), rng.integers(0, 4096, 40).astype(np.uint64)])
    n = gfn.size
    return {
        "gpa": (gfn << np.uint64(12)) + rng.integers(0, 4096 - 64, n).astype(np.uint64),
        "size": rng.choice(np.array([1, 8, 64], dtype=np.uint16), n),
        "kind": rng.choice(np.array([0, 1, 1, 2], dtype=np.uint8), n),
        "vcpu": np.zeros(n, dtype=np.uint16),
    }


INTERESTING = (-(1 << 63), -2, -1, 0, 1, 2, 3, 4, 7, 8, 511, 512, 1 << 20, 1 << 31, 1 << 32, (1 << 36) - 1,
               1 << 36, (1 << 63) - 1)


def mutate(rng, arrays: dict) -> str:
    """Damage one thing in ``arrays`` (in place); returns what, for the log."""
    names = [n for n in arrays if n != "__meta__"]
    weighted = ["scal", "scal", "tables", "tables", "ept_cache", "sppt_cache", "map_dir", "map_nodes", "sppt_root"]
    name = str(rng.choice(names + [n for n in weighted if n in arrays] + ["__meta__"]))
    if name == "__meta__":
        meta = json.loads(str(arrays[name]))
        key = str(rng.choice(["vcpus", "memslots", "profile", "hugepages"]))
        meta["config"][key] = {"vcpus": int(rng.choice([0, 1, 3, 2000])), "memslots": [[0, 4096]],
                               "profile": "v12" if meta["config"]["profile"] == "v4" else "v4",
                               "hugepages": not meta["config"]["hugepages"]}[key]
        arrays[name] = np.array(json.dumps(meta))
        return f"meta {key}"
    a = arrays[name]
    if a.size == 0:
        arrays[name] = np.zeros(3, dtype=a.dtype)
        return f"{name} grown"
    how = int(rng.integers(0, 10))
    flat = a.reshape(-1)
    i = int(rng.integers(0, flat.size))
    if how == 0 and a.ndim >= 1 and a.shape[0] > 1:  # drop rows: a pool shorter than its counter
        arrays[name] = a[: a.shape[0] - 1]
        return f"{name} cut"
    if name == "tables" and how <= 5:
        # Point an entry at another table (any kind or level), or just outside the pool.
        used = a.shape[0]
        target = int(rng.choice([int(rng.integers(0, used)), used, used + 1, -1]))
        hpa = (0x10_0000_0000 + target * 4096) & ((1 << 52) - 1)
        flat[i] = np.uint64(hpa | int(rng.choice([0x1, 0x7, 0x87, 0x3, 0x4])))
        return f"tables[{i}] -> table {target}"
    if a.dtype.kind in "iu":
        info = np.iinfo(a.dtype)
        v = int(rng.choice(INTERESTING)) if how < 8 else int(rng.integers(info.min, info.max, dtype=np.int64)
                                                             if info.max <= (1 << 63) - 1 else rng.integers(0, 1 << 62))
        fitted = v if info.min <= v <= info.max else v % (info.max + 1)
        flat[i] = np.array(fitted).astype(a.dtype)
        return f"{name}[{i}] = {v}"
    return f"{name} unchanged"


def main() -> int:
    seed, count, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from sppjit.errors import InputError, SppError, VmEntryError
    from sppjit.reference import ModelLivelock
    from sppjit.savestate import load_state

    warnings.simplefilter("ignore")
    bases = base_states(directory)
    rng = np.random.default_rng(seed)
    tr = trace()
    refused = 0
    for k in range(count):
        _, arrays = bases[k % len(bases)]
        arrays = {n: v.copy() for n, v in arrays.items()}
        what = mutate(rng, arrays)
        if rng.integers(0, 4) == 0:
            what += "; " + mutate(rng, arrays)
        print(k, what, flush=True)
        path = os.path.join(directory, "mutated.npz")
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        try:
            vm = load_state(path)
        except InputError as exc:
            if "\n" in str(exc):
                print("error of several lines:", exc)
                return 3
            refused += 1
            continue
        for engine in ("jit", "reference"):
            try:
                vm.replay(tr, engine=engine)
            except (VmEntryError, ModelLivelock, SppError, InputError):
                pass
            except Exception as exc:  # an internal error: not a crash, still a failure
                print(f"mutation {k} ({what}), {engine}: {type(exc).__name__}: {exc}")
                return 3
    print(f"done: {count} mutations, {refused} refused at load", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
