"""Hostile test encoder: answers, and leaves a daemon that writes to /output once the main process has exited."""
import os
import signal
import time

from _contract import answer


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


answer()
main = os.getpid()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: no parent, own session, deaf to SIGTERM and SIGHUP
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        while running(main):
            time.sleep(0.001)
        n = 0
        while True:  # only after the main process is gone
            n += 1
            try:
                with open(f"/output/late_{n % 8}.txt", "w") as f:
                    f.write("written after the main process exited")
                with open("/output/000000.npy", "r+b") as f:  # and corrupt an answered item
                    f.seek(128)
                    f.write(b"\xff" * 64)
            except OSError:
                pass
            time.sleep(0.002)
    os._exit(0)
time.sleep(0.2)  # the daemon is waiting by now
print("main process exits; the daemon stays", flush=True)
