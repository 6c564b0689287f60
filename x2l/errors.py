"""Every error x2l raises on purpose derives from X2LError, so the CLI and the jobs can report it in one line."""

import argparse


class X2LError(Exception):
    """Base class: the message names the input and the cause."""


class ConfigError(X2LError):
    """An option or a combination of options that cannot work."""


class VideoError(X2LError):
    """A video file that cannot be used (missing, empty, not a video, truncated before its first frame, undecodable)."""


class ModelError(X2LError):
    """A checkpoint that cannot be loaded or is not of a supported family."""


class StoreError(X2LError):
    """A KV store that cannot be read or written."""


class CorruptionError(StoreError):
    """Stored bytes that fail their checksum or are truncated; never yields tensors."""


class IncompatibleError(StoreError):
    """Stored data written by another model fingerprint or schema version."""


class NotFoundError(StoreError):
    """A video id or store path that does not exist (or was never committed)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error (missing or unknown option, bad choice or type) as one line on stderr,
    naming the command and pointing at --help, exit status 2, instead of the whole usage block (issue 12: every
    error is one line)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """text with its line breaks (a dependency's multi-line message, a trailing newline) folded into single spaces,
    so an error stays ONE line on stderr or in a listing."""
    return " ".join(str(text).split())
