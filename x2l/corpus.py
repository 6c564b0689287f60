"""What a corpus is: a local folder, an s3:// prefix, or a list file of URIs, turned into (video_id, uri) rows.

The id rule, the same for every entrypoint (`x2l index`, a folder or prefix corpus, a list file; issue 13): a video's
default id is its path relative to the corpus root, with "/" separators. `x2l index FILE` takes the file's folder as
the root, so its id is the file name, as when that folder is indexed as a corpus. A list file (.txt or .csv) has one
URI per line, optionally followed by ",id"; relative paths are relative to the list file's folder (the root), and an
absolute path or URI outside it gets its file name (`default_video_id`). Blank lines and lines starting with "#" are
ignored. Ids stay stable across runs and machines. One file is never stored twice by default: the store records which
id holds a source file's bytes, and indexing the same bytes under another id is refused (x2l index) or skipped (the
indexing job) unless duplicates are allowed.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from x2l.config import StoreConfig
from x2l.errors import ConfigError, StoreError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
LIST_EXTENSIONS = (".txt", ".csv", ".lst")


@dataclass(frozen=True)
class CorpusEntry:
    video_id: str
    uri: str


def _s3fs(config: StoreConfig | None):
    import s3fs

    return s3fs.S3FileSystem(**(config or StoreConfig()).resolved_s3_options())


def _list_file(text: str, base: str, is_s3: bool, source: str) -> list[CorpusEntry]:
    entries = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) > 2:
            raise ConfigError(f"{source}:{lineno}: expected 'uri' or 'uri,id', got {len(row)} fields")
        uri = row[0].strip()
        if lineno == 1 and uri.lower() in ("uri", "path", "video"):  # a header line
            continue
        relative = "://" not in uri and not uri.startswith("/")
        given = row[1].strip() if len(row) == 2 else ""
        video_id = given or (Path(uri).as_posix().removeprefix("./") if relative else default_video_id(uri))
        if relative:
            uri = f"{base.rstrip('/')}/{uri}" if is_s3 else str(Path(base) / uri)
        entries.append(CorpusEntry(video_id, uri))
    return entries


def default_video_id(uri: str) -> str:
    """The id of a video given alone (`x2l index FILE`, an absolute path or URI in a list file): its file name, as
    if its folder were the corpus root."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def list_corpus(uri: str, config: StoreConfig | None = None) -> list[CorpusEntry]:
    """Every video of the corpus at `uri`, sorted by id; duplicate ids are refused (they would overwrite each other)."""
    if uri.startswith("s3://"):
        fs = _s3fs(config)
        path = uri[len("s3://") :].rstrip("/")
        try:
            if path.lower().endswith(LIST_EXTENSIONS) and fs.isfile(path):
                text = fs.cat_file(path).decode()
                entries = _list_file(text, "s3://" + path.rsplit("/", 1)[0], True, uri)
            else:
                keys = [k for k in fs.find(path) if k.lower().endswith(VIDEO_EXTENSIONS)]
                entries = [CorpusEntry(k[len(path) + 1 :], "s3://" + k) for k in keys]
        except (OSError, ValueError) as e:
            raise StoreError(f"corpus {uri}: cannot list ({e})") from e
    else:
        root = Path(uri.removeprefix("file://"))
        if root.is_file() and root.suffix.lower() in LIST_EXTENSIONS:
            entries = _list_file(root.read_text(), str(root.parent), False, str(root))
        elif root.is_dir():
            entries = [
                CorpusEntry(p.relative_to(root).as_posix(), str(p))
                for p in root.rglob("*")
                if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
            ]
        elif root.exists():
            raise ConfigError(f"corpus {uri}: neither a folder nor a list file ({', '.join(LIST_EXTENSIONS)})")
        else:
            raise ConfigError(f"corpus {uri}: no such folder or file")
    seen: dict[str, str] = {}
    for e in entries:
        if e.video_id in seen:
            raise ConfigError(f"corpus {uri}: video id {e.video_id!r} is given twice ({seen[e.video_id]}, {e.uri})")
        seen[e.video_id] = e.uri
    return sorted(entries, key=lambda e: e.video_id)
