"""Command-line tools, thin layers over the library (each module's `main` is an entry point)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import ModelError


def add_chunk_args(ap: argparse.ArgumentParser) -> None:
    """llama.cpp's -c / -b / --chunks, shared by kquant-imatrix and kquant-perplexity."""
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("-b", "--batch-size", type=int, default=2048,
                    help="tokens per batch: b / c chunks run together (default 2048)")
    ap.add_argument("--chunks", type=int, default=-1, help="chunks to process (default: all)")


def add_runtime_args(ap: argparse.ArgumentParser, progress: bool = True) -> None:
    """Where and how the model runs: -t, --device (and --no-progress)."""
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the forward pass runs (default: cuda when a GPU is present)")
    if progress:
        ap.add_argument("--no-progress", action="store_true", help="no progress bar")


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
