#!/usr/bin/env python3
"""Capsa from Python in one page: a session, persistent state, live output, files, info.

    pip install ./clients/python
    python examples/python/quickstart.py   # CAPSA_ENDPOINT / CAPSA_API_KEY, or .capsa/dev.env

The test suite runs it against a real stack (clients/python/tests/test_examples.py).
"""

import tempfile
from pathlib import Path

from capsa import Capsa, Stdout


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data.csv", Path(tmp) / "out.txt"
        data.write_text("city,temp\nOslo,4\nLima,19\nPune,31\n")

        with Capsa(lifetime=600) as vm:  # creates a session; leaving the block ends it
            print("session", vm.session_id)
            vm.execute("x = 42")
            r = vm.execute("print(x)")
            print(
                f"x = {r.stdout.strip()} (exit {r.exit_code}, wall {r.wall_time:.3f}s, cpu {r.cpu_time:.3f}s)"
            )

            # Output arrives while the code runs, in chunks as the program wrote them.
            print("live output:")
            code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.5)"
            for ev in vm.stream(code):
                if isinstance(ev, Stdout):
                    print(ev.text, end="", flush=True)

            vm.upload(data, "/root/data.csv")
            vm.execute(
                "import csv\n"
                "rows = list(csv.DictReader(open('/root/data.csv')))\n"
                "open('/root/out.txt', 'w').write(f'{len(rows)} rows\\n')"
            )
            vm.download("/root/out.txt", out)
            print("downloaded:", out.read_text(), end="")

            r = vm.execute("raise ValueError('bad input')")
            print("error:", r.status.value, r.error.name if r.error else None)

            info = vm.info()
            print("status:", info.status.value, "expires", info.expire_time)
            print("extended to", vm.extend(600).expire_time)
            usage = vm.usage()
            print(
                f"usage: cpu {usage.cpu_time:.2f}s, memory {usage.memory_used_bytes >> 20} MiB"
            )
            print("active:", vm.is_active())
    print("done")


if __name__ == "__main__":
    main()
