"""Command-line tools, thin layers over the library.

Each command's entry point is a function here (`quantize`, `convert`, ...) that installs the
shared signal handling before its module (numpy, Numba) loads, then runs the module's `main`.
Every command keeps one contract: a bad input is one `PROG: error: ...` line on stderr and exit
code 1, Ctrl-C, SIGTERM and SIGHUP stop it with nothing half-written (exit 128 + the signal),
never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import signal
import sys
from typing import Callable, Iterator

from ..errors import ModelError


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that outputs are cleaned up as for
    Ctrl-C (a KeyboardInterrupt, which every `except BaseException` cleanup already handles)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped for as long as the block runs (main thread only)."""
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s]
    try:
        old = {s: signal.signal(s, _raise_stopped) for s in wanted}
    except ValueError:  # not the main thread: leave the process's handlers alone
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Stdout:
    """Whether the command left a line of stdout open (streamed text): an error message then
    starts on a line of its own instead of being glued to the text."""

    line_open = False


def stdout_line_open(state: bool) -> None:
    _Stdout.line_open = state


def _end_open_line() -> None:
    if _Stdout.line_open:
        with contextlib.suppress(Exception):
            sys.stdout.write("\n")
            sys.stdout.flush()
        _Stdout.line_open = False


def _os_error(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in str(e):
        return f"no space left on the device{where}"
    return f"{e.strerror or e}{where}"


def _interrupted(prog: str, interrupted: str, e: KeyboardInterrupt) -> int:
    _end_open_line()
    signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
    what = interrupted if signum == signal.SIGINT else interrupted.replace(
        "interrupted", f"stopped by {signal.Signals(signum).name}", 1)
    print(f"{prog}: {what}", file=sys.stderr)
    return 128 + int(signum)


def _entry(module: str, prog: str) -> Callable[[], int]:
    def main() -> int:
        with signals_as_interrupts():
            try:
                command = importlib.import_module(f"{__name__}.{module}")
            except KeyboardInterrupt as e:  # Ctrl-C while numpy and Numba load
                return _interrupted(prog, "interrupted", e)
            return command.main()
    main.__name__ = module
    return main


# the console scripts (pyproject.toml); not named after the modules, which are attributes too
quantize_entry = _entry("quantize", "kquant-quantize")
convert_entry = _entry("convert", "kquant-convert")
imatrix_entry = _entry("imatrix", "kquant-imatrix")
perplexity_entry = _entry("perplexity", "kquant-perplexity")
generate_entry = _entry("generate", "kquant-generate")
compare_entry = _entry("compare", "kquant-compare")


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


def add_cluster_arg(ap: argparse.ArgumentParser) -> None:
    """--cluster: the work on a Dask cluster (kquant.cluster)."""
    ap.add_argument("--cluster", metavar="ADDRESS",
                    help="run on a Dask cluster: a scheduler (tcp://host:8786) or local:N (N worker "
                         "processes here); needs pip install 'kquant[dist]'")


def positive(name: str, value: int) -> None:
    """The one wording for a count that must be above 0 (-c, -b, ...)."""
    if value <= 0:
        raise ModelError(f"{name} must be a number above 0, not {value}")


def check_chunk_args(ns: argparse.Namespace) -> None:
    """-c and -b above 0; --chunks -1 (all) or above 0: no chunks would write an empty result."""
    positive("-c (--ctx-size)", ns.ctx_size)
    positive("-b (--batch-size)", ns.batch_size)
    if ns.chunks == 0 or ns.chunks < -1:
        raise ModelError(f"--chunks must be a number above 0, or -1 for all of the text, not {ns.chunks}")


def _raw_names_printable() -> None:
    """Names from a GGUF file keep bytes that are not UTF-8 (as surrogates, as llama.cpp keeps
    the bytes): print them back as those bytes rather than fail on them."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="surrogateescape")


def run_command(prog: str, body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a command's body with the tools' shared error contract: a bad input (ModelError) or
    an OS error is one `PROG: error: ...` line on stderr and exit code 1; Ctrl-C, SIGTERM and
    SIGHUP print one line and exit 128 + the signal, after the body's cleanups ran."""
    _raw_names_printable()
    with signals_as_interrupts():
        try:
            return body()
        except ModelError as e:
            _end_open_line()
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # unwritable folder, disk full, ...: outputs are written atomically
            _end_open_line()
            print(f"{prog}: error: {_os_error(e)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            return _interrupted(prog, interrupted, e)
