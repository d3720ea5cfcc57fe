"""Hostile test encoder: tries every call the sandbox's seccomp profile forbids, prints what each gave, answers.

One line ``SYSCALLS {"ptrace": "EPERM", ...}``: the errno name, or "allowed" when a call went through.
"""
import ctypes
import errno
import json
import mmap
import os
import platform
import signal
import socket
import subprocess
import threading

from _contract import answer

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ARCH = platform.machine()
NR = {  # syscall numbers without a libc wrapper we can rely on
    "x86_64": {"clone": 56, "process_vm_readv": 310, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
               "keyctl": 250, "io_uring_setup": 425, "pidfd_getfd": 438},
    "aarch64": {"clone": 220, "process_vm_readv": 270, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
                "keyctl": 219, "io_uring_setup": 425, "pidfd_getfd": 438},
}[ARCH]
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17


def outcome(ret) -> str:
    return "allowed" if ret != -1 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def sys_call(name, *args):
    return outcome(libc.syscall(NR[name], *[ctypes.c_long(a) for a in args]))


def clone_newuser():
    ret = libc.syscall(NR["clone"], ctypes.c_long(CLONE_NEWUSER | SIGCHLD), *[ctypes.c_long(0)] * 4)
    if ret == 0:
        os._exit(0)  # the child of an allowed clone
    if ret > 0:
        os.waitpid(ret, 0)
    return outcome(ret)


def vsock():
    try:
        socket.socket(40, socket.SOCK_STREAM).close()  # AF_VSOCK
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def i386_call():
    """getpid through the 32-bit ABI (int 0x80), in a child: the profile's native-only filter kills it."""
    if ARCH != "x86_64":
        return "n/a"
    pid = os.fork()
    if pid == 0:
        code = bytes([0x53, 0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0x5B, 0xC3])  # push rbx; mov eax,20; int 0x80; pop rbx; ret
        buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        buf.write(code)
        ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else "allowed"


results = {
    "ptrace": outcome(libc.ptrace(0, 0, None, None)),  # PTRACE_TRACEME: would freeze us under our init
    "process_vm_readv": sys_call("process_vm_readv", os.getppid(), 0, 0, 0, 0, 0),
    "pidfd_getfd": sys_call("pidfd_getfd", 0, 0, 0),
    "unshare": outcome(libc.unshare(CLONE_NEWUSER)),
    "clone_newuser": clone_newuser(),
    "mount": outcome(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "personality": outcome(libc.personality(0xFFFFFFFF)),
    "bpf": sys_call("bpf", 0, 0, 0),
    "perf_event_open": sys_call("perf_event_open", 0, 0, -1, -1, 0),
    "userfaultfd": sys_call("userfaultfd", 0),
    "keyctl": sys_call("keyctl", 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "io_uring_setup": sys_call("io_uring_setup", 1, 0),
    "socket_vsock": vsock(),
    "i386_abi": i386_call(),
}
# What an encoder does need still works: threads, fork, exec.
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
results["subprocess"] = subprocess.run(["true"]).returncode == 0 and "works"
print("SYSCALLS " + json.dumps(results, sort_keys=True), flush=True)
answer()
