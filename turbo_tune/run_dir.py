"""The run folder: one run at a time writes into it, never over an earlier run, and its files honour the umask."""

import errno
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from turbo_tune.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".turbo-tune.lock"
RUN_OUTPUTS = ("config.json", "adapter_config.json", "trainer_state.json", "model.safetensors")


@dataclass
class Claim:
    folder: Path
    lock_fd: int
    created: bool


_claims: list[Claim] = []  # held until the run ends; the kernel releases a dead run's lock by itself


def check_no_earlier_run(output_dir: Path) -> None:
    """Refuse a folder that holds checkpoints or a model of an earlier run (resuming it is another matter)."""
    if not output_dir.is_dir():
        return
    earlier = [p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-") or p.name in RUN_OUTPUTS]
    if earlier:
        raise ConfigError(
            f"--output_dir {output_dir} already holds an earlier run ({', '.join(sorted(earlier)[:3])}). "
            "Resume it with --resume_from_checkpoint last, or choose a new --output_dir."
        )


def claim_output_dir(output_dir: str, resuming: bool, is_main_process: bool) -> None:
    """Make the run folder this run's alone, on the main process, before anything is written into it.

    The claim is an exclusive flock on OUTPUT_DIR/.turbo-tune.lock, held until release_claims(): a second run on the
    same folder is refused while the first one runs, and the lock of a run that died goes with its process. Under the
    lock a fresh run checks again that no earlier run finished there. Other ranks wait for the main process's verdict.
    """
    error = None
    if is_main_process:
        try:
            _claim(Path(output_dir), resuming)
        except ConfigError as refusal:
            error = str(refusal)
    if dist.is_initialized():
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        raise ConfigError(error)


def _claim(folder: Path, resuming: bool) -> None:
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise ConfigError(
            f"--output_dir {folder}: cannot write there ({error.strerror}). Choose a folder this user can write to."
        ) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            logger.warning("--output_dir %s: this file system cannot lock files (%s); a second run on the same folder "
                           "would not be noticed.", folder, error.strerror)
        else:
            holder = os.read(lock_fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise ConfigError(
                f"--output_dir {folder} is in use by another run (process {holder}). Wait for it to end, or choose "
                "a new --output_dir."
            ) from None
    claim = Claim(folder, lock_fd, created)
    _claims.append(claim)
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    if not resuming:
        check_no_earlier_run(folder)


def release_claims() -> None:
    """When the run ends: give the folders back, and remove those it created and left empty (after a refusal)."""
    while _claims:
        claim = _claims.pop()
        os.close(claim.lock_fd)
        if claim.created and {p.name for p in claim.folder.iterdir()} == {LOCK_FILE}:
            (claim.folder / LOCK_FILE).unlink()
            claim.folder.rmdir()


def honour_umask(folder: Path) -> None:
    """safetensors (0.8) writes through a temporary file that is created 0600 and renamed into place, so weights
    would be unreadable to the group while every other file follows the umask (safetensors/safetensors#782)."""
    mode = 0o666 & ~current_umask()
    for file in folder.glob("*.safetensors"):
        if file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def current_umask() -> int:
    """Read, not set: os.umask would change it for every thread for a moment."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o077)
        os.umask(mask)
        return mask
