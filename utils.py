"""Shared helpers: user errors, JSON and file I/O, seeding, and the CLI wrapper."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"  # logs a missing optional kernel on AVX-512 BF16 CPUs


class UserError(Exception):
    """A mistake in the user's input or arguments: reported in one line, exit status 2."""


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; a UserError becomes one line on stderr and exit status 2.

    ``--debug`` anywhere on the command line shows the full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    silence_known_noise()
    try:
        main(args)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _not_a_missing_kernel(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


def silence_known_noise() -> None:
    """Hide two third-party messages a user cannot act on, which every run printed: peft reads
    transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning for every adapter it
    wraps), and bitsandbytes, which peft imports, logs on CPUs with AVX-512 BF16 that an optional
    4-bit kernel package is missing (4-bit loading needs CUDA here anyway). Nothing else is hidden."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_not_a_missing_kernel)  # added once, however often called


def parse_json_bytes(raw: bytes, source: str) -> Any:
    """Parse JSON bytes, turning every way they can be broken into a one-line UserError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not UTF-8 text (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{source}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return parse_json_bytes(path.read_bytes(), str(path))


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSON-lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    records = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: malformed JSON on line {lineno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    return records


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON atomically (UTF-8, non-ASCII kept)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def wait_until(done: Callable[[], bool], poll_seconds: float = 2.0, sleep: Callable[[float], Any] = time.sleep) -> None:
    """Poll ``done`` until it is true: how the processes of one launch wait for each other's files
    instead of in a collective barrier, which fails once one process waits longer than the
    backend's timeout (10 minutes for NCCL, 30 for gloo). A process that dies ends the launch
    (accelerate stops the others), so the wait cannot hang."""
    while not done():
        sleep(poll_seconds)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as err:
        raise UserError(f"{path}: output folder cannot be written ({err.strerror})") from None
    return path


def stable_seed(seed: int, key: str) -> int:
    """A seed for one item (a user) that depends only on the run seed and the item's key."""
    return (seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**31 - 1)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (when installed)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass
