"""Hostile test encoder: fills the image's VOLUME /scratch, reports what it is, then answers."""
import json
import os

from _contract import answer

CHUNK = b"\0" * (1 << 20)
written, error = 0, None
fd = os.open("/scratch/fill", os.O_WRONLY | os.O_CREAT)
try:
    while written < 256 << 20:  # far over the sandbox's tmpfs cap
        written += os.write(fd, CHUNK)
except OSError as e:
    error = e.strerror
finally:
    os.close(fd)
fstype = next((line.split(" - ")[1].split()[0] for line in open("/proc/self/mountinfo")
               if line.split()[4] == "/scratch"), None)
print("VOLUME " + json.dumps({"fstype": fstype, "written_mib": written >> 20, "error": error,
                              "model_visible": os.path.exists("/opt/data/model.bin")}), flush=True)
answer()
