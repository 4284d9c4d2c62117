"""File hashing (attnfd_pipeline.utils.sha256_file, the checkpoints' sidecar hash)."""

import hashlib

from attnfd_pipeline.utils import sha256_file


def test_sha256_file_is_the_standard_digest(tmp_path):
    abc = tmp_path / "abc"
    abc.write_bytes(b"abc")  # the FIPS 180-2 test vector
    assert sha256_file(abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big"
    data = bytes(range(256)) * (3 * 4096 + 7)  # several read blocks and a partial one
    big.write_bytes(data)
    assert sha256_file(str(big)) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
