"""Compare kquant's std::regex pre-tokenizers with llama.cpp's own unicode_regex_split.

    python tools/pretok_reference.py [--llama-cpp DIR] [--pre gpt-4o tekken] [--random 3000]

llama.cpp runs the GPT-4o and Tekken patterns through std::regex on a "collapsed" text
(src/unicode.cpp); kquant's splitters (kquant/tokenizer/pretokenize.py, _step_gpt4o) work out
that regex's backtracking by hand.  This compiles llama.cpp's unicode.cpp and unicode-data.cpp
with g++ into a small program that prints the piece lengths unicode_regex_split gives, and
compares them with kquant's pieces on the shared texts, the tokenizer test's tricky strings and
random strings over the characters the patterns treat apart (ASCII case, contractions, digits,
spaces, CR/LF, '/', non-ASCII letters, marks, numbers, spaces and symbols).

DIR is llama.cpp's source (default $KQUANT_LLAMA_CPP; the llama-cpp-python 0.3.36 sdist's
vendor/llama.cpp).  Needs g++.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# llama-vocab.cpp's regex_exprs (checked against the source before use)
REGEX = {
    "gpt-4o": "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]"
              "|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]"
              "|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "tekken": "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])"
              "([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
}

_MAIN = r'''
#include "unicode.h"
#include <fstream>
#include <iostream>
#include <sstream>
int main(int argc, char ** argv) {
    std::ifstream rf(argv[1]); std::stringstream rs; rs << rf.rdbuf();
    std::stringstream ts; ts << std::cin.rdbuf();
    for (auto & w : unicode_regex_split(ts.str(), {rs.str()}, false)) std::cout << w.size() << ' ';
    return 0;
}
'''

ALPHABET = list("aAzZ'sStTrReEvVmMlLdD \t\n\r\x0b/!?.,$<>`09") + [
    "À", "é", "ß", "Σ", "σ", "东", "١", "²", "\u0301", "\u00a0", "\u2003", "☃", "€", "\u200d", "ǅ", "ʰ",
    "\U0001F600", "\u0085", "Ⅳ"]


def llama_cpp_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("KQUANT_LLAMA_CPP"):
        return Path(os.environ["KQUANT_LLAMA_CPP"])
    sys.exit("error: llama.cpp's source is needed: --llama-cpp DIR or $KQUANT_LLAMA_CPP "
             "(e.g. the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp)")


def build(src: Path, work: Path) -> Path:
    (work / "main.cpp").write_text(_MAIN)
    exe = work / "split"
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{src / 'src'}", f"-I{src / 'include'}", str(work / "main.cpp"),
                    str(src / "src" / "unicode.cpp"), str(src / "src" / "unicode-data.cpp"), "-o", str(exe)],
                   check=True)
    return exe


def theirs(exe: Path, regex_file: Path, text: str) -> list[str]:
    data = text.encode("utf-8", "surrogatepass")
    out = subprocess.run([str(exe), str(regex_file)], input=data, capture_output=True, check=True).stdout
    pieces, i = [], 0
    for n in map(int, out.split()):
        pieces.append(data[i:i + n].decode("utf-8", "surrogatepass"))
        i += n
    return pieces


def ours(text: str, steps) -> list[str]:
    from kquant.tokenizer import pretokenize, unicode

    cp = unicode.codepoints(text)
    pieces, i = [], 0
    for n in pretokenize.split(cp, unicode.flags_of(cp), steps):
        pieces.append(text[i:i + n])
        i += n
    return pieces


def texts(n_random: int) -> list[tuple[str, str]]:
    from test_tokenizer import TRICKY

    shared = ROOT.parent / "shared" / "text"
    out = [(f.name, f.read_text(encoding="utf-8", errors="replace")[:400_000])
           for f in sorted(shared.rglob("*")) if f.suffix in (".txt", ".raw")]
    out += [(f"tricky {i}", t) for i, t in enumerate(TRICKY)]
    rng = random.Random(0)
    out += [(f"random {i}", "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))))
            for i in range(n_random)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", help="llama.cpp's source folder")
    ap.add_argument("--pre", nargs="+", default=list(REGEX), choices=list(REGEX))
    ap.add_argument("--random", type=int, default=3000, help="random strings per pre-tokenizer")
    args = ap.parse_args()

    from kquant.tokenizer import BPE_PRE_TOKENIZERS

    src = llama_cpp_dir(args.llama_cpp)
    vocab_cpp = (src / "src" / "llama-vocab.cpp").read_text()
    cases = texts(args.random)
    bad = 0
    with tempfile.TemporaryDirectory() as work:
        exe = build(src, Path(work))
        for pre in args.pre:
            regex = REGEX[pre]
            if regex.replace("\\", "\\\\") not in vocab_cpp:
                print(f"{pre}: the regex is not llama-vocab.cpp's any more; update REGEX")
                return 1
            regex_file = Path(work) / f"{pre}.re"
            regex_file.write_text(regex)
            steps = BPE_PRE_TOKENIZERS[pre]["steps"]
            differ = 0
            for name, text in cases:
                a, b = ours(text, steps), theirs(exe, regex_file, text)
                if a != b:
                    differ += 1
                    if differ <= 5:
                        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                        print(f"  {pre} {name}: kquant {a[max(0, k - 2):k + 3]!r} llama.cpp {b[max(0, k - 2):k + 3]!r}")
            print(f"{pre}: {len(cases)} texts, {differ} differ")
            bad += differ
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
