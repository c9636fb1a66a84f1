"""Input digests: BLAKE3 by default, named in every digest; SHA-256 digests of older
summaries still verify (docs/contract.md §8)."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from sppjit import provenance as P

blake3 = pytest.importorskip("blake3")


def _bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", [0, 1, P.CHUNK - 1, 2 * P.CHUNK + 5])
def test_blake3_digest_equals_an_independent_computation(tmp_path, size):
    data = _bytes(size, size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert P.file_digest(path) == "blake3:" + blake3.blake3(data).hexdigest()
    assert P.file_digest(path, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()


def test_multithreaded_digest_equals_the_single_threaded_one(tmp_path, monkeypatch):
    data = _bytes(2 * P.CHUNK + 12345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    monkeypatch.setattr(P, "digest_threads", lambda: 4)
    assert P.file_digest(path) == "blake3:" + blake3.blake3(data).hexdigest()


def test_directory_digest_covers_names_and_bytes_in_sorted_order(tmp_path):
    (tmp_path / "b.parquet").write_bytes(b"bee")
    (tmp_path / "a.parquet").write_bytes(b"ay")
    expect = blake3.blake3(b"a.parquet\0ay" + b"b.parquet\0bee").hexdigest()
    assert P.file_digest(tmp_path) == "blake3:" + expect


def test_replay_summary_names_the_algorithm(tmp_path):
    """The summary of `sppjit replay` records BLAKE3 digests of its inputs, under the same
    "digests" key as before: "blake3:<hex>", the hex equal to blake3 of the file's bytes."""
    from typer.testing import CliRunner

    from cli import app

    trace = tmp_path / "t.arrow"
    table = pa.table({"gpa": np.arange(0, 64 * 4096, 4096, dtype=np.uint64)})
    with pa.OSFile(str(trace), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    summary = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["replay", str(trace), "--memory", "1MiB",
                                      "--summary", str(summary)])
    assert result.exit_code == 0, result.output
    doc = json.loads(summary.read_text())
    digest = doc["provenance"]["digests"]["trace"]
    assert digest == "blake3:" + blake3.blake3(trace.read_bytes()).hexdigest()
    assert P.digest_algorithm(digest) == "blake3"
    assert P.verify_summary_digests(doc, {"trace": trace}) == {"trace": True}


def test_old_sha256_summaries_still_verify(tmp_path):
    """A summary written the old way (SHA-256 of the input, by hashlib) verifies; a changed
    input does not; a digest of neither algorithm is not checked."""
    trace = tmp_path / "t.parquet"
    trace.write_bytes(_bytes(10_000, 1))
    old = {"provenance": {"digests": {
        "trace": "sha256:" + hashlib.sha256(trace.read_bytes()).hexdigest(),
        "protect": "unavailable: [Errno 13] Permission denied"}}}
    assert P.digest_algorithm(old["provenance"]["digests"]["trace"]) == "sha256"
    assert P.verify_digest(trace, old["provenance"]["digests"]["trace"])
    assert P.verify_summary_digests(old, {"trace": trace, "protect": trace,
                                          "ops": trace}) == {
        "trace": True, "protect": None, "ops": None}
    with open(trace, "r+b") as f:  # one byte changed
        f.seek(5000)
        f.write(bytes([trace.read_bytes()[5000] ^ 1]))
    assert P.verify_summary_digests(old, {"trace": trace}) == {"trace": False}
    new = {"provenance": {"digests": {"trace": P.file_digest(trace)}}}
    assert P.verify_summary_digests(new, {"trace": trace}) == {"trace": True}


def test_upper_case_hex_and_unknown_algorithms(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    assert P.verify_digest(path, "sha256:" + hashlib.sha256(b"x").hexdigest().upper())
    for bad in ("md5:abc", "sha256:", "nothing", "unavailable: reason"):
        assert P.digest_algorithm(bad) is None
        with pytest.raises(ValueError):
            P.verify_digest(path, bad)


def test_sha256_where_blake3_cannot_be_imported(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_blake3(name, *args, **kwargs):
        if name == "blake3":
            raise ImportError("no blake3")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_blake3)
    path = tmp_path / "f"
    path.write_bytes(b"data")
    assert P.default_algorithm() == "sha256"
    assert P.file_digest(path) == "sha256:" + hashlib.sha256(b"data").hexdigest()
