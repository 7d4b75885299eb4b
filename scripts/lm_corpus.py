"""Gather English text that exists offline into one file, one sentence per line, for ``edge-asr build-lm``.

Sources (each skipped with a note if absent):
- King James Bible: Debian ``bible-kjv`` (``bible -f 'Gen1:1-Rev22:21'``), 0.8 M words;
- literary quotations in GCIDE (Webster 1913, Debian ``dict-gcide``): the "..." --Author passages, which are
  18th/19th-century prose and verse, close to what LibriSpeech reads;
- Debian ``fortunes`` files.
The LibriSpeech training transcripts are added by ``build-lm --data`` itself; dev/test transcripts never are.

    python scripts/lm_corpus.py --out runs/lm/corpus.txt
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess

SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def kjv() -> list[str]:
    if not shutil.which("bible"):
        print("skip KJV: `bible` not installed (apt-get install bible-kjv)")
        return []
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]
    return [s for v in verses for s in SENTENCE_END.split(v)]


def gcide_quotations(path: str = "/usr/share/dictd/gcide.dict.dz") -> list[str]:
    if not os.path.exists(path):
        print(f"skip GCIDE: {path} not found (apt-get install dict-gcide)")
        return []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = re.sub(r"\s+", " ", f.read())
    quotes = re.findall(r'"([^"]{25,400}?)"\s*--[A-Z]', text)
    return [s for q in quotes for s in SENTENCE_END.split(q.replace("[bd]", "").replace("{", "").replace("}", ""))]


def fortunes(folder: str = "/usr/share/games/fortunes") -> list[str]:
    if not os.path.isdir(folder):
        print(f"skip fortunes: {folder} not found")
        return []
    lines = []
    for name in sorted(os.listdir(folder)):
        if "." not in name:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                for block in f.read().split("\n%\n"):
                    lines += SENTENCE_END.split(re.sub(r"\s+", " ", block))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    total = 0
    with open(args.out, "w") as f:
        for name, source in (("kjv", kjv), ("gcide", gcide_quotations), ("fortunes", fortunes)):
            sentences = [s.strip() for s in source() if len(s.split()) >= 2]
            words = sum(len(s.split()) for s in sentences)
            total += words
            print(f"{name}: {len(sentences)} sentences, {words} words")
            f.write("\n".join(sentences) + "\n")
    print(f"{total} words in {args.out}")


if __name__ == "__main__":
    main()
