"""What a user of the command line sees on stderr: x2l's own progress and errors, and the libraries' logs, warnings
and progress bars (transformers, huggingface_hub, Ray) only when asked for with --verbose (issue 13)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

_LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "ray", "ray.data", "ray.serve", "filelock", "fsspec", "s3fs")


def configure(verbose: bool) -> None:
    """Quiet libraries (the default) or let them speak (verbose). Call once, before the libraries are imported if
    possible: transformers reads its verbosity from the environment then."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the weight-loading bar
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its fork warning
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Warnings raised inside the libraries about their own internals; x2l's own calls do not raise any (tests hold it).
    for module in ("transformers", "huggingface_hub", "torch", "ray", "pyarrow", "s3fs", "aiobotocore"):
        warnings.filterwarnings("ignore", module=module)
    if "transformers" in sys.modules:  # imported already: its own switches
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def broken_pipe() -> int:
    """The reader of stdout went away (`x2l store ls | head`): not an error of x2l. End quietly, with no second
    complaint when Python flushes stdout at exit; 141 is what a shell reports for a process ended by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141
