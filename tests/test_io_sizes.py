"""--memory sizes."""

import pytest

from sppjit.errors import InputError
from sppjit.io.sizes import parse_size


@pytest.mark.parametrize("text, size", [
    ("4GiB", 4 << 30), ("512MiB", 512 << 20), ("4G", 4 << 30), ("4096", 4096),
    ("1TiB", 1 << 40), ("2M", 2 << 20), ("64k", 64 << 10), ("8KB", 8 << 10),
    ("1.5GiB", 3 << 29), (" 2 gib ", 2 << 30), ("8192B", 8192), (1 << 20, 1 << 20),
    ("256TiB", 1 << 48),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "4XB", "4 GiBs", "-4GiB", "4iB", "0x1000", "four"])
def test_junk_cannot_be_parsed(text):
    with pytest.raises(InputError) as caught:
        parse_size(text)
    assert str(caught.value) == f"--memory: cannot parse size '{text}'"


@pytest.mark.parametrize("text, reason", [
    ("0", "must be positive"), (0, "must be positive"), (-4096, "must be positive"),
    ("5000", "not a multiple of 4096"), ("1.1K", "not a whole number of bytes"),
    ("257TiB", "48-bit guest-physical space"), (True, "cannot parse"),
])
def test_sizes_that_are_no_memory(text, reason):
    with pytest.raises(InputError, match=reason):
        parse_size(text)
