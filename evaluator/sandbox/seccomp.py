"""The seccomp profile of every sandbox container: what Docker's default blocks, plus ptrace and friends.

    flags["security_opt"] = ["no-new-privileges", f"seccomp={profile_json()}"]

Why our own profile: the engine's default allows ``ptrace`` on kernels >= 4.8, and a container that
called ``ptrace(PTRACE_TRACEME)`` froze its own init. A profile given with ``--security-opt`` *replaces*
the default one, and the default (an allow-list compiled into dockerd) cannot be read over the API, so
this is a deny-list: ``defaultAction`` allows, and the calls below fail with EPERM. A deny-list keeps
every ordinary call an encoder may need (numpy, onnxruntime, CUDA libraries) working; its gaps are
covered by the rest of the sandbox (no capabilities, no-new-privileges, no network, user 65534).

What is denied, group by group (`DENIED`): debugging other processes (ptrace, process_vm_readv/writev,
kcmp, pidfd_getfd, process_madvise); new namespaces (unshare, setns, and clone with any namespace flag;
clone3 answers ENOSYS so that libc falls back to clone, whose flags can be checked); mounts and root
changes; kernel keyrings, modules, kexec, bpf, perf_event_open, userfaultfd, io_uring; clocks, swap,
reboot, quotas, accounting; NUMA policy calls; personality and the legacy calls Docker's default also
refuses. Sockets: AF_VSOCK (reaches the hypervisor even with network none) and AF_ALG (kernel crypto).
With every capability dropped, this covers everything Docker's default refuses on x86_64 and arm64, and
also refuses a few calls it allows (io_uring, modify_ldt, name_to_handle_at, clock_adjtime).

Foreign ABIs: the profile names no architectures, so runc builds it for the native one only and the
kernel kills a process that makes an i386 (``int 0x80``) or x32 call; the deny-list cannot be bypassed
by another ABI's syscall numbers. Names unknown on an architecture (e.g. ``umount`` on x86_64) are
skipped by runc.
"""

from __future__ import annotations

import functools
import json

EPERM = 1
ENOSYS = 38

DENIED: dict[str, tuple[str, ...]] = {  # group -> syscalls that fail with EPERM
    "other processes": ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
                        "process_madvise"),
    "namespaces": ("unshare", "setns"),
    "mounts": ("mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
               "fsconfig", "fsmount", "fspick", "mount_setattr", "open_tree_attr", "listmount", "statmount",
               "name_to_handle_at", "open_by_handle_at", "fanotify_init"),
    "kernel": ("bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "init_module",
               "finit_module", "delete_module", "create_module", "query_module", "get_kernel_syms",
               "kexec_load", "kexec_file_load", "io_uring_setup", "io_uring_enter", "io_uring_register",
               "lookup_dcookie", "syslog"),
    "host state": ("reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "settimeofday", "stime",
                   "clock_settime", "clock_adjtime", "sethostname", "setdomainname", "vhangup", "iopl",
                   "ioperm"),
    "memory policy": ("mbind", "set_mempolicy", "get_mempolicy", "set_mempolicy_home_node", "migrate_pages",
                      "move_pages"),
    "legacy": ("personality", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl", "vm86", "vm86old",
               "modify_ldt"),
}
CLONE_NAMESPACE_FLAGS = {  # clone(2) flags (argument 0 on x86_64 and arm64) that make a namespace
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
DENIED_SOCKET_FAMILIES = {"AF_ALG": 38, "AF_VSOCK": 40}  # socket(2) argument 0


def profile() -> dict:
    """The profile as a dict in Docker's seccomp JSON format (``errnoRet`` needs Docker >= 20.10)."""
    rules: list[dict] = [
        {"names": sorted(name for names in DENIED.values() for name in names),
         "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    # One rule per flag: the arguments of one rule are ANDed, separate rules are ORed.
    for flag in CLONE_NAMESPACE_FLAGS.values():
        rules.append({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
                      "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]})
    for family in DENIED_SOCKET_FAMILIES.values():
        rules.append({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
                      "args": [{"index": 0, "value": family, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]})
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}


@functools.lru_cache(maxsize=1)
def profile_json() -> str:
    """`profile` as the compact JSON string ``security_opt=["seccomp=<json>"]`` carries."""
    return json.dumps(profile(), separators=(",", ":"), sort_keys=True)
