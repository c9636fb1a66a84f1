#!/usr/bin/env python3
"""Extract the uncompressed vmlinux (an ELF with a PVH entry note) from a bzImage.

Debian's kernels are xz-compressed (CONFIG_KERNEL_XZ): the payload is the first xz stream
in the file whose decompressed form starts with the ELF magic. Usage:
extract_vmlinux.py vmlinuz-6.1.0-NN-amd64 vmlinux
"""

import lzma
import sys

XZ_MAGIC = b"\xfd7zXZ\x00"


def extract(image: bytes) -> bytes:
    start = image.find(XZ_MAGIC)
    while start >= 0:
        try:
            out = lzma.LZMADecompressor().decompress(image[start:])
        except lzma.LZMAError:
            out = b""
        if out.startswith(b"\x7fELF"):
            return out
        start = image.find(XZ_MAGIC, start + 1)
    raise SystemExit("no xz-compressed ELF found (not an xz bzImage?)")


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as src:
        data = extract(src.read())
    with open(sys.argv[2], "wb") as dst:
        dst.write(data)
