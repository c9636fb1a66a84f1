"""The ioctl ABI: request numbers as the uapi header builds them, and the structs byte-exact.

Profile v4: ``struct kvm_subpage { __u64 base_gfn; __u64 npages; __u32 access_map[64]; }``
(272 bytes, little-endian); ``KVM_INIT_SPP`` switches SPP on. ``vm_ioctl`` mirrors the v4
wrapper (kvm_vm_ioctl cases of the series): ENODEV before init, EFAULT when the buffer cannot be
copied, EINVAL for npages 0 or > 64, and the set/get count on success.

Profile v12: ``struct kvm_subpage { __u64 gfn_base; __u32 npages; __u32 flags; __u32
access_map[]; }`` (a 16-byte header and 4 bytes per page); SPP is switched on with
``KVM_ENABLE_CAP`` and ``struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; __u8
pad[64]; }`` (104 bytes), its capability reported by ``KVM_CHECK_EXTENSION``; KVM_INIT_SPP is
gone (-ENOTTY). The v12 wrapper (K-v12-5): ENODEV before enable, EFAULT when the header cannot
be copied, EINVAL for flags != 0 or npages > 512, 0 for npages == 0, EFAULT when the
access_map[] cannot be copied, then the set/get count.
"""

from __future__ import annotations

import errno
import operator

import numpy as np

from . import bits as B
from .defaults import PROFILES

KVM_SUBPAGE_V4 = np.dtype(
    [("base_gfn", "<u8"), ("npages", "<u8"), ("access_map", "<u4", (B.SUBPAGE_MAX_BITMAP,))]
)
assert KVM_SUBPAGE_V4.itemsize == 272
assert KVM_SUBPAGE_V4.fields["access_map"][1] == 16

# v12: the fixed header of struct kvm_subpage; access_map[] follows it (kvm_subpage_v12_dtype).
KVM_SUBPAGE_V12_HEADER = np.dtype([("gfn_base", "<u8"), ("npages", "<u4"), ("flags", "<u4")])
assert KVM_SUBPAGE_V12_HEADER.itemsize == 16
assert KVM_SUBPAGE_V12_HEADER.fields["npages"][1] == 8
assert KVM_SUBPAGE_V12_HEADER.fields["flags"][1] == 12

KVM_ENABLE_CAP_STRUCT = np.dtype(
    [("cap", "<u4"), ("flags", "<u4"), ("args", "<u8", (4,)), ("pad", "u1", (64,))]
)
assert KVM_ENABLE_CAP_STRUCT.itemsize == 104
assert KVM_ENABLE_CAP_STRUCT.fields["args"][1] == 8
assert KVM_ENABLE_CAP_STRUCT.fields["pad"][1] == 40

ENOTTY = errno.ENOTTY


def kvm_subpage_v12_dtype(npages: int) -> np.dtype:
    """The v12 ``struct kvm_subpage`` with ``access_map[npages]``: 16 + 4 * npages bytes."""
    fields = [("gfn_base", "<u8"), ("npages", "<u4"), ("flags", "<u4")]
    if npages:
        fields.append(("access_map", "<u4", (int(npages),)))
    dt = np.dtype(fields)
    assert dt.itemsize == 16 + 4 * int(npages)
    return dt


def kvm_subpage(base_gfn: int, access_map, npages: int | None = None, profile: str = "v4",
                flags: int = 0) -> bytearray:
    """A ``struct kvm_subpage`` of ``profile`` as a writable buffer.

    v4: 272 bytes (``flags`` must be 0: v4 has no such field). v12: 16 + 4 * len(access_map)
    bytes; ``npages`` (default len(access_map)) and ``flags`` are written into the header as
    given, so malformed requests can be built too.
    """
    maps = np.asarray(access_map, dtype=np.uint32).ravel()
    if profile == "v12":
        buf = np.zeros(1, dtype=kvm_subpage_v12_dtype(len(maps)))
        buf["gfn_base"] = base_gfn
        buf["npages"] = len(maps) if npages is None else npages
        buf["flags"] = flags
        if len(maps):
            buf["access_map"][0, :] = maps
        return bytearray(buf.tobytes())
    if profile != "v4":
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    if flags:
        raise ValueError("the v4 struct kvm_subpage has no flags field")
    buf = np.zeros(1, dtype=KVM_SUBPAGE_V4)
    buf["base_gfn"] = base_gfn
    buf["npages"] = len(maps) if npages is None else npages
    buf["access_map"][0, : len(maps)] = maps
    return bytearray(buf.tobytes())


def kvm_enable_cap(cap: int, flags: int = 0, args=(0, 0, 0, 0)) -> bytearray:
    """A 104-byte ``struct kvm_enable_cap``."""
    buf = np.zeros(1, dtype=KVM_ENABLE_CAP_STRUCT)
    buf["cap"] = cap
    buf["flags"] = flags
    buf["args"][0, : len(args)] = args
    return bytearray(buf.tobytes())


def _bytes(arg, nbytes: int) -> np.ndarray | None:
    """The first ``nbytes`` of the caller's buffer (shared memory), None if they cannot be read
    (copy_from_user fails): no buffer, too short, or not one contiguous piece of memory."""
    try:
        mv = memoryview(arg)
        if mv.nbytes < nbytes:
            return None
        flat = mv.cast("B")  # a strided (non-contiguous) buffer is no user pointer: TypeError
    except (TypeError, ValueError):
        return None
    return np.frombuffer(flat, dtype=np.uint8, count=nbytes)


def _view(arg) -> np.ndarray | None:
    """The caller's buffer as a v4 kvm_subpage record (shared memory), None if it cannot be read."""
    raw = _bytes(arg, KVM_SUBPAGE_V4.itemsize)
    return None if raw is None else raw.view(KVM_SUBPAGE_V4)


def _readonly(arg) -> bool:
    return memoryview(arg).readonly


def vm_ioctl(vm, request: int, arg=None) -> int:
    if vm.config.profile == "v12":
        return _vm_ioctl_v12(vm, request, arg)
    return _vm_ioctl_v4(vm, request, arg)


def _vm_ioctl_v4(vm, request: int, arg) -> int:
    if request == B.KVM_INIT_SPP:
        r = vm._kvm_init_spp()
        # v4 NULLs the x86_ops without hardware support and kvm_arch_init_spp answers -EINVAL.
        return -B.EINVAL if r == -B.ENODEV else r
    if request == B.KVM_CHECK_EXTENSION:
        return 0  # v4 has no KVM_CAP_X86_SPP: every extension it is asked about is unknown here
    if request == B.KVM_ENABLE_CAP:
        raw = _bytes(arg, KVM_ENABLE_CAP_STRUCT.itemsize)
        if raw is None:
            return -B.EFAULT
        rec = raw.view(KVM_ENABLE_CAP_STRUCT)
        return vm._kvm_enable_cap(int(rec["cap"][0]), int(rec["flags"][0]))  # -EINVAL: unknown cap
    if request in (B.KVM_SUBPAGES_GET_ACCESS, B.KVM_SUBPAGES_SET_ACCESS):
        if not vm.spp_active:
            return -B.ENODEV
        rec = _view(arg)
        if rec is None:
            return -B.EFAULT  # copy_from_user of the whole struct failed
        npages = int(rec["npages"][0])
        if npages == 0 or npages > B.SUBPAGE_MAX_BITMAP:
            return -B.EINVAL
        return _set_or_get(vm, request, arg, int(rec["base_gfn"][0]), rec["access_map"][0, :npages])
    return -ENOTTY


def _vm_ioctl_v12(vm, request: int, arg) -> int:
    if request == B.KVM_CHECK_EXTENSION:
        try:
            cap = operator.index(arg)
        except TypeError:
            return -B.EINVAL
        return vm._kvm_check_extension(cap)
    if request == B.KVM_ENABLE_CAP:
        raw = _bytes(arg, KVM_ENABLE_CAP_STRUCT.itemsize)
        if raw is None:
            return -B.EFAULT  # copy_from_user of struct kvm_enable_cap failed
        rec = raw.view(KVM_ENABLE_CAP_STRUCT)
        return vm._kvm_enable_cap(int(rec["cap"][0]), int(rec["flags"][0]))
    if request in (B.KVM_SUBPAGES_GET_ACCESS, B.KVM_SUBPAGES_SET_ACCESS):
        if not vm.spp_active:
            return -B.ENODEV
        raw = _bytes(arg, KVM_SUBPAGE_V12_HEADER.itemsize)
        if raw is None:
            return -B.EFAULT  # copy_from_user of the header failed
        head = raw.view(KVM_SUBPAGE_V12_HEADER)
        npages, flags = int(head["npages"][0]), int(head["flags"][0])
        if flags != 0 or npages > B.KVM_SUBPAGE_MAX_PAGES:
            return -B.EINVAL
        if npages == 0:
            return 0
        raw = _bytes(arg, KVM_SUBPAGE_V12_HEADER.itemsize + 4 * npages)
        if raw is None:
            return -B.EFAULT  # copy_from_user of header + access_map[npages] failed
        rec = raw.view(kvm_subpage_v12_dtype(npages))
        return _set_or_get(vm, request, arg, int(rec["gfn_base"][0]), rec["access_map"][0])
    return -ENOTTY  # KVM_INIT_SPP included: v12 has no such ioctl


def _set_or_get(vm, request: int, arg, base_gfn: int, access_map: np.ndarray) -> int:
    """The body both profiles share once their struct is parsed: ``access_map`` is the view of
    the caller's npages maps. SET copies them in; GET copies them out (copy_to_user) only when
    every gfn had a memslot. Returns npages, or -EFAULT."""
    npages = access_map.shape[0]
    if request == B.KVM_SUBPAGES_SET_ACCESS:
        done = vm._kvm_set_subpages(base_gfn, access_map.copy())
    else:
        out = np.empty(npages, dtype=np.uint32)
        done = _get(vm, base_gfn, out)
        if done == npages:
            if _readonly(arg):
                return -B.EFAULT  # copy_to_user into a read-only buffer
            access_map[:] = out
    return npages if done == npages else -B.EFAULT


def _get(vm, base_gfn: int, out: np.ndarray) -> int:
    from .kernels.mmu import kvm_get_subpages

    with vm.slots_lock, vm.mmu_lock:
        return int(kvm_get_subpages(vm.state, np.uint64(base_gfn), out, len(out)))
