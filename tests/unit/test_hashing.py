"""Content digests, and remembering them within one walk over cached manifests."""

from __future__ import annotations

import hashlib
import os

from ppoflow.hashing import remembered_digests, sha256_file


def test_within_the_block_an_unchanged_file_is_hashed_once_and_a_changed_one_again(tmp_path):
    path = tmp_path / "prompts-2026-12-01.jsonl"
    path.write_bytes(b"night one")
    first = sha256_file(path)
    assert first == hashlib.sha256(b"night one").hexdigest()
    stamp = os.stat(path).st_mtime_ns
    with remembered_digests():
        assert sha256_file(path) == first
        path.write_bytes(b"night two")  # same size, and the old modification time put back: taken as unchanged
        os.utime(path, ns=(stamp, stamp))
        assert sha256_file(path) == first
        with remembered_digests():  # nested: the same memory
            assert sha256_file(path) == first
        os.utime(path, ns=(stamp + 1, stamp + 1))  # any change of size, time or inode is read again
        assert sha256_file(path) == hashlib.sha256(b"night two").hexdigest()
    os.utime(path, ns=(stamp, stamp))
    assert sha256_file(path) == hashlib.sha256(b"night two").hexdigest()  # nothing is remembered past the block
