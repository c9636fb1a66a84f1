"""The ioctl ABI: request numbers as the uapi header builds them, and the structs byte-exact.

v4's ``struct kvm_subpage { __u64 base_gfn; __u64 npages; __u32 access_map[64]; }`` is 272
bytes, little-endian. ``vm_ioctl`` mirrors the v4 wrapper (kvm_vm_ioctl cases of the series):
ENODEV before init, EFAULT when the buffer cannot be copied, EINVAL for npages 0 or > 64, and
the set/get count on success.
"""

from __future__ import annotations

import errno

import numpy as np

from . import bits as B

KVM_SUBPAGE_V4 = np.dtype(
    [("base_gfn", "<u8"), ("npages", "<u8"), ("access_map", "<u4", (B.SUBPAGE_MAX_BITMAP,))]
)
assert KVM_SUBPAGE_V4.itemsize == 272
assert KVM_SUBPAGE_V4.fields["access_map"][1] == 16

ENOTTY = errno.ENOTTY


def kvm_subpage(base_gfn: int, access_map, npages: int | None = None) -> bytearray:
    """A v4 ``struct kvm_subpage`` as a writable 272-byte buffer."""
    maps = np.asarray(access_map, dtype=np.uint32).ravel()
    buf = np.zeros(1, dtype=KVM_SUBPAGE_V4)
    buf["base_gfn"] = base_gfn
    buf["npages"] = len(maps) if npages is None else npages
    buf["access_map"][0, : len(maps)] = maps
    return bytearray(buf.tobytes())


def _view(arg) -> np.ndarray | None:
    """The caller's buffer as a kvm_subpage record (shared memory), None if it cannot be read."""
    try:
        mv = memoryview(arg)
    except TypeError:
        return None
    if mv.nbytes < KVM_SUBPAGE_V4.itemsize:
        return None
    raw = np.frombuffer(mv.cast("B"), dtype=np.uint8, count=KVM_SUBPAGE_V4.itemsize)
    return raw.view(KVM_SUBPAGE_V4)


def vm_ioctl(vm, request: int, arg=None) -> int:
    if request == B.KVM_INIT_SPP:
        r = vm._kvm_init_spp()
        # v4 NULLs the x86_ops without hardware support and kvm_arch_init_spp answers -EINVAL.
        return -B.EINVAL if r == -B.ENODEV else r
    if request == B.KVM_CHECK_EXTENSION:
        return 0  # v4 has no KVM_CAP_X86_SPP: every extension it is asked about is unknown here
    if request in (B.KVM_SUBPAGES_GET_ACCESS, B.KVM_SUBPAGES_SET_ACCESS):
        if not vm.spp_active:
            return -B.ENODEV
        rec = _view(arg)
        if rec is None:
            return -B.EFAULT  # copy_from_user of the whole struct failed
        npages = int(rec["npages"][0])
        if npages == 0 or npages > B.SUBPAGE_MAX_BITMAP:
            return -B.EINVAL
        base_gfn = int(rec["base_gfn"][0])
        if request == B.KVM_SUBPAGES_SET_ACCESS:
            done = vm._kvm_set_subpages(base_gfn, rec["access_map"][0, :npages].copy())
        else:
            out = np.empty(npages, dtype=np.uint32)
            from .kernels.mmu import kvm_get_subpages

            with vm.slots_lock, vm.mmu_lock:
                done = int(kvm_get_subpages(vm.state, np.uint64(base_gfn), out, npages))
            if done == npages:
                if memoryview(arg).readonly:
                    return -B.EFAULT  # copy_to_user into a read-only buffer
                rec["access_map"][0, :npages] = out
        return npages if done == npages else -B.EFAULT
    return -ENOTTY
