"""Hostile test encoder: writes outside /output; answers normally only if a write lands."""
import sys

from _contract import answer

last = None
for target in ["/input/pwned", "/input/audio/pwned", "/pwned", "/etc/pwned", "/opt/pwned", "/var/tmp/pwned"]:
    try:
        with open(target, "w") as f:
            f.write("pwned")
        print(f"wrote {target}", file=sys.stderr)
        answer()
        sys.exit(0)
    except OSError as e:
        last = e
raise last
