"""The ``[network]`` configuration section: how ``fedguard server`` serves a run to clients."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fedguard.config import option, register_section
from fedguard.pipeline.base import ConfigurationError


@dataclass
class NetworkConfig:
    """[network] serving a run to client processes over gRPC (fedguard server / fedguard client)."""

    address: str = option("127.0.0.1:50051", "host:port the server listens on (0.0.0.0:PORT for every interface; port 0 picks a free one).")
    tls: str = option("auto", "TLS: 'auto' uses it whenever cert is set and requires it outside loopback; 'on'; 'off' (loopback only).", choices=["auto", "on", "off"])
    cert: str = option("", "Server certificate (PEM), e.g. certs/server.pem from `fedguard certs`.")
    key: str = option("", "Server private key (PEM), e.g. certs/server-key.pem.")
    client_ca: str = option("", "CA certificate (PEM) of client certificates: when set, clients need a certificate (mutual TLS) whose name matches their id and is active in the registry on every call.")
    mtls: str = option("auto", "Mutual TLS: 'auto' requires client certificates (network.client_ca) outside loopback and uses them on loopback when client_ca is set; 'on' always; 'off' never (clients then authenticate by their key alone).", choices=["auto", "on", "off"])
    clients: str = option("", "Registry of client keys (clients.json from `fedguard certs`); a client not in it, or revoked, is refused.")
    min_clients: int = option(0, "Connected clients to wait for before each round (0: all of data.num_clients).", min=0)
    wait_timeout_s: float = option(600.0, "Longest wait for min_clients before a round goes on with the clients connected.", min=0.0)
    round_deadline_s: float = option(300.0, "Longest wait for the replies to one request of a round; clients that did not answer count as dropped.", min=0.1)
    skip_disconnected: bool = option(True, "A client that was connected before and is disconnected when a round starts counts as dropped at once (instead of being waited for until the deadline).")
    max_message_mb: float = option(512.0, "Largest message payload accepted from a client (MiB); larger ones are refused before they are read.", min=0.001)
    chunk_kb: int = option(1024, "Size of the data frames messages are cut into (KiB).", min=1, max=3072)
    first_frame_s: float = option(10.0, "Longest wait for the first frame of a reply (Submit) before the call is cancelled and counted as a refusal (idle streams are evicted).", min=0.1)
    idle_s: float = option(60.0, "Longest gap between two frames of one reply before the call is cancelled.", min=0.1)
    max_calls_per_client: int = option(4, "Calls one client identity may hold open at once (its certificate under mutual TLS, its key once a reply's header is authenticated); more are refused at once.", min=2)
    max_unauthenticated_calls: int = option(32, "Replies in flight whose first frame has not been authenticated yet, all peers together; more are refused at once.", min=1)
    keepalive_s: float = option(10.0, "Seconds between keep-alive frames on idle task streams and between TCP keep-alive pings.", min=0.5)


register_section("network", NetworkConfig)


def split_address(address: str) -> tuple[str, int]:
    """(host, port) from 'host:port' or '[v6]:port'."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"network address {address!r} must look like host:port")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_tls(net: NetworkConfig) -> bool:
    """Whether the server must serve TLS; refuses plaintext outside loopback."""
    host, _ = split_address(net.address)
    wants = net.tls == "on" or (net.tls == "auto" and (bool(net.cert) or not is_loopback(host)))
    if wants and not (net.cert and net.key):
        raise ConfigurationError(
            f"network: TLS is required for {net.address} but network.cert/network.key are not set; "
            "make a development CA and certificates with `fedguard certs --out certs --clients N`"
        )
    if not wants and not is_loopback(host):
        raise ConfigurationError(f"network.tls = 'off' is only allowed on loopback, not on {net.address}")
    if net.client_ca and not wants:
        raise ConfigurationError("network.client_ca (mutual TLS) needs TLS on: set network.cert and network.key")
    mutual(net)
    return wants


def mutual(net: NetworkConfig) -> bool:
    """Whether clients must present a certificate; refuses a server outside loopback without one
    unless ``network.mtls = 'off'`` says so explicitly."""
    host, _ = split_address(net.address)
    if net.mtls == "off":
        if net.client_ca:
            raise ConfigurationError("network.mtls = 'off' but network.client_ca is set: unset one of them")
        return False
    if net.client_ca:
        return True
    if net.mtls == "on" or not is_loopback(host):
        raise ConfigurationError(
            f"network: mutual TLS is required for {net.address} (network.mtls = '{net.mtls}') but network.client_ca "
            "is not set; set it to the CA of the client certificates (certs/ca.pem from `fedguard certs`), or "
            "network.mtls = 'off' to accept clients by their key alone"
        )
    return False
