"""Geometry of the guest-physical space that every input file is checked against."""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
# SPP splits a 4 KiB page into 32 sub-pages of 128 bytes; bit i of a write-access map is
# sub-page i.
SUBPAGE_SHIFT = 7
# 4-level EPT translates 48-bit guest-physical addresses; nothing beyond is reachable.
GPA_LIMIT = 1 << 48
GFN_LIMIT = GPA_LIMIT >> PAGE_SHIFT
