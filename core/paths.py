"""Where things live: the repository's asset folders, the app's data folder, the Hugging Face hub.

Light on purpose (no torch): `models`, `saes`, `sae_index` and `steering` share these, and the
hub functions import huggingface_hub only when called.
"""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = ROOT / "assets" / "models"  # the embedded models, one folder each
SAE_DIR = ROOT / "assets" / "saes"  # the embedded SAEs, in sae_lens's disk format
DATA_ENV = "CIRCUIT_EXPLORER_DATA"
HUB_PROBE_SECONDS = 1.0


def data_dir() -> Path:
    """Where the app keeps what it computes (feature indexes, saved directions):
    $CIRCUIT_EXPLORER_DATA, else `.data/` in the repository."""
    return Path(os.environ.get(DATA_ENV) or ROOT / ".data")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Can we open a TCP connection to the Hugging Face hub within `timeout` seconds?

    Name resolution can hang far longer than a socket timeout, so the probe runs in a daemon
    thread and we stop waiting after `timeout`.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


_hub_mode_lock = threading.Lock()


@contextmanager
def hub_offline(offline: bool):
    """Switch huggingface_hub (and so transformers, sae_lens) to offline mode for one download.

    `HF_HUB_OFFLINE` in os.environ is read once at import, so we set the flag the libraries
    read at call time. Hub loads are serialised so one load's mode never leaks into another's.
    """
    from huggingface_hub import constants

    with _hub_mode_lock:
        old = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = old or offline
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = old
