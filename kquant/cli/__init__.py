"""Command-line tools, thin layers over the library (each module's `main` is an entry point)."""
from __future__ import annotations

import sys
from typing import Callable

from ..errors import ModelError


def run_command(prog: str, body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a command's body with the tools' shared error contract: a bad input (ModelError) or
    an OS error is one `PROG: error: ...` line on stderr and exit code 1, Ctrl-C exit 130."""
    try:
        return body()
    except ModelError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # unwritable folder, disk full, ...: outputs are written atomically
        where = f": {e.filename}" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
