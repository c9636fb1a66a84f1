"""Exceptions raised by sppjit, and the one place that maps them to exit codes."""

import errno as _errno


class SppError(OSError):
    """A KVM control-plane call failed; ``errno`` is the positive errno the kernel returns."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)


class InputError(ValueError):
    """Bad user input (a trace, protection, memslot or ops file, or an option value).

    The command line prints the message as one line and exits with code 2.
    """


class VmEntryError(RuntimeError):
    """VM entry failed a VMCS consistency check (SDM 26.2; Bochs vmx.cc for SPP)."""


ERRNO_NAMES = {
    _errno.EPERM: "EPERM",
    _errno.ENOMEM: "ENOMEM",
    _errno.EFAULT: "EFAULT",
    _errno.ENODEV: "ENODEV",
    _errno.EINVAL: "EINVAL",
}


class Terminated(BaseException):
    """SIGTERM arrived (sppjit.io.signals): unwinds like KeyboardInterrupt, so that outputs
    are rolled back, and ends the command line with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
