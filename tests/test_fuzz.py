"""Every reader fed seeded mutations through the command line (docs/reliability.md).

Valid inputs of every kind (traces in each format, protection, memslots, timeline, a saved
state, each converter's text) are mutated by byte flips, truncations and splices, and each
mutant goes through the command that reads it. The property, whatever the mutant: exit 0,
or exit 2 with exactly one ``sppjit: error:`` line on standard error; never another code,
a signal or a traceback; and no file left behind (outputs only on success, never a
temporary).

The mutants run in a worker process (this file run as a script), through the same in-process
path the other CLI tests use (typer's CliRunner): a crash of compiled code kills the worker,
not pytest, and the test names the case it was running. The bounded run that CI does is
``FUZZ_ITERATIONS`` mutants per target; ``pytest --fuzz-iterations N`` (or the environment
variable SPPJIT_FUZZ_ITERATIONS) runs longer, ``--fuzz-seed`` another sequence.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ_ITERATIONS = 40  # per target in the bounded run (15-40 s on 2 cores, all targets)


# --------------------------------------------------------------------------- the corpus

def build_corpus(directory: Path) -> dict[str, Path]:
    """Small valid inputs of every kind sppjit reads."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from sppjit.cli import app

    directory.mkdir(parents=True, exist_ok=True)
    rows = 300
    rng = np.random.default_rng(0)
    table = pa.table({"gpa": rng.integers(0, 1 << 20, rows, dtype=np.uint64) * 8,
                      "size": np.full(rows, 8, np.uint16),
                      "vcpu": rng.integers(0, 2, rows, dtype=np.uint16),
                      "kind": rng.integers(0, 3, rows, dtype=np.uint8),
                      "seq": np.arange(rows, dtype=np.uint64),
                      "note": pa.array([f"n{i}" for i in range(rows)])})
    corpus = {}
    corpus["trace.parquet"] = directory / "trace.parquet"
    pq.write_table(table, corpus["trace.parquet"], row_group_size=100)
    corpus["trace.arrow"] = directory / "trace.arrow"
    with ipc.new_file(corpus["trace.arrow"], table.schema) as writer:
        writer.write_table(table, max_chunksize=100)
    corpus["trace-lz4.arrow"] = directory / "trace-lz4.arrow"
    with ipc.new_file(corpus["trace-lz4.arrow"], table.schema,
                      options=ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table, max_chunksize=100)
    corpus["trace.arrows"] = directory / "trace.arrows"
    with ipc.new_stream(corpus["trace.arrows"], table.schema) as writer:
        writer.write_table(table, max_chunksize=100)
    texts = {
        "protect.csv": "gfn,access\n1,0x0000ffff\n2,0\n0x30,4294967295\n",
        "protect.json": json.dumps([{"gfn": 1, "access": "0xffff0000"}, {"gfn": 5, "access": 7}]),
        "protect.jsonl": '{"gfn": 1, "access": 0}\n{"gfn": 9, "access": "0x1"}\n',
        "ranges.csv": "gpa,length,name\n0x1008,16,cred\n0x5000,8,slot\n",
        "memslots.csv": "slot,base_gfn,npages\n0,0,128\n1,200,100\n",
        "memslots.json": json.dumps([{"slot": 0, "base_gfn": 0, "npages": 256}]),
        "ops.csv": "at,op,gfn,npages,access\n10,set_subpages,1,1,0x0\n50,zap,1,1,\n"
                   "90,remap,2,1,\n200,delete_memslot,210,,\n",
        "ops.jsonl": '{"at": 5, "op": "set_subpages", "gfn": 1, "access": 0}\n'
                     '{"at": 20, "op": "zap", "gfn": 1}\n',
    }
    for name, text in texts.items():
        corpus[name] = directory / name
        corpus[name].write_text(text)
    corpus["protect.parquet"] = directory / "protect.parquet"
    pq.write_table(pa.table({"gfn": pa.array([1, 2, 3], pa.uint64()),
                             "access": pa.array([0, 0xFFFF, 0xFFFF0000], pa.uint32())}),
                   corpus["protect.parquet"])
    fixtures = ROOT / "tests" / "fixtures" / "convert"
    for name in ("lackey_true.txt", "pinatrace_sized.out", "drmemtrace_view.txt", "accesses.csv"):
        corpus[name] = directory / name
        shutil.copyfile(fixtures / name, corpus[name])
    corpus["accesses.csv.gz"] = directory / "accesses.csv.gz"
    corpus["accesses.csv.gz"].write_bytes(gzip.compress((fixtures / "accesses.csv").read_bytes()))
    corpus["state.npz"] = directory / "state.npz"
    result = CliRunner().invoke(app, ["replay", str(corpus["trace.parquet"]), "--vcpus", "2",
                                      "--memory", "16MiB", "--protect",
                                      str(corpus["protect.csv"]), "--save-state",
                                      str(corpus["state.npz"])])
    assert result.exit_code == 0, result.output
    return corpus


# ------------------------------------------------------------------------- the targets

# Each target: the corpus file mutated, and the command that reads it ({input} is the
# mutant, {out} a fresh directory, {corpus} the valid files).
_REPLAY = ["replay", "--memory", "16MiB", "--vcpus", "2", "--batch-size", "64"]
TARGETS = {
    "trace-parquet": ("trace.parquet", ["replay", "{input}", "--memory", "16MiB", "--vcpus",
                                        "2", "--out", "{out}/r.parquet", "--batch-size", "64"]),
    "trace-arrow": ("trace.arrow", ["replay", "{input}", "--memory", "16MiB", "--vcpus", "2",
                                    "--out", "{out}/r.arrow", "--exits", "{out}/e.parquet"]),
    "trace-arrow-lz4": ("trace-lz4.arrow", ["replay", "{input}", "--memory", "16MiB", "--vcpus",
                                            "2", "--out", "{out}/r.parquet"]),
    "trace-stream": ("trace.arrows", ["replay", "{input}", "--memory", "16MiB", "--vcpus", "2",
                                      "--summary", "{out}/s.json"]),
    "protect-csv": ("protect.csv", [*_REPLAY, "{corpus}/trace.parquet", "--protect", "{input}",
                                    "--summary", "{out}/s.json"]),
    "protect-json": ("protect.json", [*_REPLAY, "{corpus}/trace.parquet", "--protect", "{input}"]),
    "protect-jsonl": ("protect.jsonl", [*_REPLAY, "{corpus}/trace.parquet", "--protect",
                                        "{input}"]),
    "protect-parquet": ("protect.parquet", [*_REPLAY, "{corpus}/trace.parquet", "--protect",
                                            "{input}"]),
    "ranges-csv": ("ranges.csv", [*_REPLAY, "{corpus}/trace.parquet", "--protect", "{input}"]),
    "memslots-csv": ("memslots.csv", ["replay", "{corpus}/trace.parquet", "--vcpus", "2",
                                      "--memslots", "{input}", "--out", "{out}/r.parquet"]),
    "memslots-json": ("memslots.json", ["replay", "{corpus}/trace.parquet", "--vcpus", "2",
                                        "--memslots", "{input}"]),
    "ops-csv": ("ops.csv", ["replay", "{corpus}/trace.parquet", "--vcpus", "2", "--memslots",
                            "{corpus}/memslots.csv", "--protect", "{corpus}/protect.csv",
                            "--ops", "{input}", "--summary", "{out}/s.json"]),
    "ops-jsonl": ("ops.jsonl", [*_REPLAY, "{corpus}/trace.parquet", "--protect",
                                "{corpus}/protect.csv", "--ops", "{input}"]),
    "state": ("state.npz", ["inspect", "{input}", "--gpa", "0x1000", "--json"]),
    "convert-lackey": ("lackey_true.txt", ["convert", "lackey", "{input}", "--out",
                                           "{out}/t.parquet", "--mapping-out", "{out}/m.parquet"]),
    "convert-pinatrace": ("pinatrace_sized.out", ["convert", "pinatrace", "{input}", "--out",
                                                  "{out}/t.arrow"]),
    "convert-drmemtrace": ("drmemtrace_view.txt", ["convert", "drmemtrace", "{input}", "--out",
                                                   "{out}/t.parquet"]),
    "convert-csv": ("accesses.csv", ["convert", "csv", "{input}", "--out", "{out}/t.parquet"]),
    "convert-gzip": ("accesses.csv.gz", ["convert", "csv", "{input}", "--out",
                                         "{out}/t.parquet", "--skip-bad"]),
}


# -------------------------------------------------------------------------- mutations

def mutate(data: bytes, rng: random.Random, donors: list[bytes]) -> bytes:
    """One seeded mutant: bit flips, a truncation, a splice from another input, a chunk
    duplicated or a run of random or boundary bytes, sometimes several of these."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.randrange(6)
        if not out:
            out = bytearray(rng.randbytes(rng.randrange(1, 64)))
            continue
        i = rng.randrange(len(out))
        if kind == 0:  # flip a few bits
            for _ in range(rng.randint(1, 8)):
                j = rng.randrange(len(out))
                out[j] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            out = out[:i]
        elif kind == 2:  # splice in a piece of another input
            donor = rng.choice(donors)
            if donor:
                start = rng.randrange(len(donor))
                piece = donor[start:start + rng.randint(1, 256)]
                out[i:i + rng.randint(0, len(piece))] = piece
        elif kind == 3:  # duplicate a chunk
            j = min(len(out), i + rng.randint(1, 512))
            out[i:i] = out[i:j]
        elif kind == 4:  # random bytes
            out[i:i + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
        else:  # boundary values: 0, 0xff runs, big integers in text
            choice = rng.choice((b"\x00" * 8, b"\xff" * 8, b"18446744073709551616",
                                 b"-1", b"0x", b"\n\n", b"\"", b",,,", b"9" * 40))
            out[i:i] = choice
    return bytes(out)


# ------------------------------------------------------------------------- the worker

def check_result(result, out: Path) -> str | None:
    """Why a run broke the property, or None."""
    stderr = result.stderr
    if "Traceback" in result.output or "Traceback" in stderr:
        return f"traceback: {stderr[-2000:]}"
    left = sorted(os.listdir(out))
    temporaries = [name for name in left if name.startswith(".")]
    if temporaries:
        return f"temporaries left: {temporaries}"
    if result.exit_code == 0:
        return None
    if result.exit_code != 2:
        return f"exit {result.exit_code}: {stderr[-2000:]}"
    lines = stderr.splitlines()
    if len(lines) != 1 or not lines[0].startswith("sppjit: error: "):
        return f"not one error line: {lines!r}"
    if left:
        return f"failed run left outputs: {left}"
    return None


def worker(corpus_dir: str, targets: list[str], seed: int, iterations: int,
           progress: str) -> int:
    """Run ``iterations`` mutants of each target; print a JSON object of failures by
    target. Before each case, its target and index go to ``progress`` so that a crash can
    be named."""
    from typer.testing import CliRunner

    from sppjit.cli import app

    runner = CliRunner()
    corpus = Path(corpus_dir)
    donors = [path.read_bytes() for path in sorted(corpus.iterdir()) if path.is_file()]
    failures: dict[str, list] = {}
    for target in targets:
        name, template = TARGETS[target]
        original = (corpus / name).read_bytes()
        rng = random.Random(f"{seed}:{target}")
        work = Path(progress).parent / f"work-{target}"
        failures[target] = []
        for case in range(iterations):
            mutant = mutate(original, rng, donors)
            if work.exists():
                shutil.rmtree(work)
            out = work / "out"
            out.mkdir(parents=True)
            path = work / name
            path.write_bytes(mutant)
            args = [arg.format(input=path, out=out, corpus=corpus) for arg in template]
            with open(progress, "w") as handle:
                handle.write(f"{target} case {case}")
            result = runner.invoke(app, args)
            if (why := check_result(result, out)) is not None:
                keep = Path(progress).parent / f"failure-{target}-{case}{Path(name).suffix}"
                keep.write_bytes(mutant)
                failures[target].append({"case": case, "why": why, "mutant": str(keep)})
    print(json.dumps(failures))
    return 0


# ------------------------------------------------------------------------------ tests

def _iterations(request) -> int:
    option = request.config.getoption("--fuzz-iterations", default=None)
    if option is not None:
        return int(option)
    return int(os.environ.get("SPPJIT_FUZZ_ITERATIONS", FUZZ_ITERATIONS))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, request):
    """Every target's mutants, run by one worker process (one start of numba and pyarrow
    for all of them): its failures by target, or why the worker died."""
    base = tmp_path_factory.mktemp("fuzz")
    corpus = build_corpus(base / "corpus")
    seed = request.config.getoption("--fuzz-seed", default=None) or 0
    iterations = _iterations(request)
    progress = base / "progress"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPPJIT_DEBUG", None)
    directory = str(next(iter(corpus.values())).parent)
    done = subprocess.run([sys.executable, __file__, directory, ",".join(sorted(TARGETS)),
                           str(seed), str(iterations), str(progress)], capture_output=True,
                          text=True, env=env, timeout=3600)
    if done.returncode != 0:
        where = progress.read_text() if progress.exists() else "?"
        return seed, None, (f"the worker died (exit {done.returncode}) on {where} of seed "
                            f"{seed}: {done.stderr[-2000:]}")
    return seed, json.loads(done.stdout.splitlines()[-1]), None


@pytest.mark.fuzz
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_mutants_exit_cleanly(target, fuzzed):
    seed, failures, died = fuzzed
    if died is not None:
        pytest.fail(died)
    assert failures[target] == [], f"{target}, seed {seed}: {failures[target]}"


def test_mutations_are_seeded_and_varied():
    data = bytes(range(256)) * 4
    donors = [b"donor bytes" * 10]
    first = [mutate(data, random.Random(f"1:{i}"), donors) for i in range(50)]
    again = [mutate(data, random.Random(f"1:{i}"), donors) for i in range(50)]
    assert first == again
    assert len(set(first)) > 40 and data not in first
    assert any(len(m) < len(data) for m in first) and any(len(m) > len(data) for m in first)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]),
                    sys.argv[5]))
