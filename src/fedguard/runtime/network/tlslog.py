"""Failed TLS handshakes as fedguard refusals.

gRPC's TLS handshakes happen in its C core, which tells Python nothing about a refused one:
it writes one line to the process's stderr (``Handshake failed with error SSL_ERROR_SSL:
...PEER_DID_NOT_RETURN_A_CERTIFICATE``). :func:`install` (called by ``fedguard server``, not
by the library) puts a pipe under file descriptor 2, copies every line through unchanged and
hands each handshake failure, with its cause in words, to the subscribed servers, which log
it as one refusal line and count it. Without :func:`install` nothing changes.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable

_subscribers: list[Callable[[str], None]] = []
_lock = threading.Lock()
_installed = False

#: OpenSSL/BoringSSL reasons in gRPC's line -> what it means for a fedguard deployment
CAUSES = (
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "the client presented no certificate (mutual TLS requires one: "
                                          "client --cert client-K.pem --cert-key client-K-key.pem)"),
    ("CERTIFICATE_VERIFY_FAILED", "the client's certificate is not signed by network.client_ca"),
    ("BAD_SIGNATURE", "the client's certificate is not signed by network.client_ca"),
    ("certificate signature failure", "the client's certificate is not signed by network.client_ca"),
    ("CERTIFICATE_EXPIRED", "the client's certificate has expired"),
    ("certificate has expired", "the client's certificate has expired"),
    ("WRONG_VERSION_NUMBER", "the peer does not speak TLS (a plaintext client? use --ca, not --insecure)"),
    ("HTTP_REQUEST", "the peer does not speak TLS (a plaintext client? use --ca, not --insecure)"),
    ("UNKNOWN_CA", "the client does not trust the server's certificate (its --ca is another CA)"),
    ("BAD_CERTIFICATE", "the client refused the server's certificate (its --ca is another CA, or the name differs)"),
)


def cause(line: str) -> str:
    """What a gRPC handshake-failure line means, in words (the raw reason when unknown)."""
    for marker, text in CAUSES:
        if marker in line:
            return text
    return line.split("Handshake failed", 1)[-1].strip(" :") or "TLS handshake failed"


def subscribe(callback: Callable[[str], None]) -> None:
    """Call ``callback(cause)`` for each failed handshake (while :func:`install` is in effect)."""
    with _lock:
        _subscribers.append(callback)


def unsubscribe(callback: Callable[[str], None]) -> None:
    """Stop calling ``callback``."""
    with _lock:
        if callback in _subscribers:
            _subscribers.remove(callback)


def _publish(line: str) -> None:
    with _lock:
        callbacks = list(_subscribers)
    for callback in callbacks:
        try:
            callback(cause(line))
        except Exception:  # noqa: BLE001 - a subscriber's failure must not stop the copying
            pass


def _pump(read_fd: int, out_fd: int) -> None:
    buffer = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        os.write(out_fd, chunk)
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            if b"Handshake failed" in raw:
                _publish(raw.decode(errors="replace"))


def install() -> bool:
    """Watch this process's stderr for gRPC's handshake failures (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return False
        _installed = True
    out_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_pump, args=(read_fd, out_fd), name="fedguard-tls-log", daemon=True)
    pump.start()
    atexit.register(_drain, pump, out_fd)
    return True


def _drain(pump: threading.Thread, out_fd: int, timeout: float = 5.0) -> None:
    """At exit, put the real stderr back under fd 2 (closing the pipe's last writer) and let the pump copy
    what is left: without this, lines written just before exit (why a run failed) die with the daemon thread."""
    import sys

    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(out_fd, 2)
    pump.join(timeout)
