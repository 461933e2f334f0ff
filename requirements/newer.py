"""Print the packages whose version in a ``pip freeze`` differs from the lock: ``newer.py LOCK FREEZE``."""

from __future__ import annotations

import re
import sys

from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def pins(path: str) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = PIN.match(line)
            if m:
                out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: newer.py LOCK FREEZE", file=sys.stderr)
        return 2
    locked, resolved = pins(argv[0]), pins(argv[1])
    changed = sorted(n for n in resolved.keys() & locked.keys() if resolved[n] != locked[n])
    added = sorted(resolved.keys() - locked.keys())
    print(f"{len(resolved)} packages resolved; {len(changed)} differ from {argv[0]}, {len(added)} not in it")
    for name in changed:
        print(f"  {name}: {locked[name]} (lock) -> {resolved[name]}")
    for name in added:
        print(f"  {name}: {resolved[name]} (not locked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
