"""The ``fedguard server``, ``fedguard client`` and ``fedguard certs`` subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )


def _cmd_server(args: argparse.Namespace) -> int:
    import fedguard.plugins  # noqa: F401  (every family registers its config section)
    from fedguard.config import Config
    from fedguard.runtime.network import tlslog
    from fedguard.runtime.network.server import serve

    tlslog.install()  # gRPC's failed TLS handshakes become refusal lines and counts
    _setup_logging()
    log = logging.getLogger("fedguard.server").info
    if args.resume:
        config = Config.load(args.config or Path(args.resume) / "config.toml", args.overrides)
    else:
        config = Config.load(args.config, args.overrides)
    try:
        from fedguard.privacy.noise import refuse_seeded_noise

        refuse_seeded_noise(config)  # dp: reproducible noise is for simulations only (issue 13)
        serve(config, args.out, args.resume, log)
    except (OSError, ValueError) as exc:
        logging.getLogger("fedguard.server").error("%s", exc)
        return 2
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    import torch

    from fedguard.runtime.network.auth import AuthError
    from fedguard.runtime.network.client import EXIT_CONFIG, ClientOptions, ClientSetupError, NetworkClient

    _setup_logging()
    torch.set_num_threads(max(1, args.threads))
    opts = ClientOptions(
        server=args.server,
        key_file=args.key,
        client_id=args.id,
        ca=args.ca,
        cert=args.cert,
        cert_key=args.cert_key,
        insecure=args.insecure,
        server_name=args.server_name,
        data=args.data,
        data_dir=args.data_dir,
        config=args.config,
        state_dir=args.state_dir,
        retry_s=args.retry_s,
        threads=args.threads,
        privacy_floor=args.privacy_floor,
        privacy_floor_trusted=args.privacy_floor_trusted,
        privacy_floor_delta=args.privacy_floor_delta,
    )
    try:
        return NetworkClient(opts).run()
    except (AuthError, ClientSetupError, OSError) as exc:
        logging.getLogger("fedguard.client").error("%s", exc)
        return EXIT_CONFIG


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedguard.runtime.network import certs

    out = Path(args.out)
    if args.revoke or args.reinstate:
        if args.revoke:
            certs.set_revoked(out, args.revoke, True)
        if args.reinstate:
            certs.set_revoked(out, args.reinstate, False)
        print(f"updated {out / 'clients.json'}: revoked {args.revoke or []}, reinstated {args.reinstate or []}")
        return 0
    if args.add:
        written = certs.add_clients(out, args.add, args.days)
        print(f"added clients {args.add}: {', '.join(str(p) for p in written)}")
        return 0
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    certs.make_dev_pki(out, args.clients, hosts, args.days)
    print(
        f"wrote a development CA, a server certificate for {', '.join(hosts)} and keys for clients "
        f"0..{args.clients - 1} to {out}/ (keep ca-key.pem and *-key.pem private; give client K "
        f"ca.pem, client-K.key, client-K.pem and client-K-key.pem)"
    )
    return 0


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_network_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``server``, ``client`` and ``certs`` to the ``fedguard`` command."""
    server = sub.add_parser("server", help="serve a run to client processes over the network (gRPC)")
    server.add_argument("config", nargs="?", help="TOML configuration with a [network] section")
    server.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one option (repeatable)")
    server.add_argument("--out", help="run folder (default: <run.out_dir>/<name>-<time>)")
    server.add_argument("--resume", metavar="RUN_DIR", help="continue a run after a crash, from its last checkpoint")
    server.set_defaults(func=_cmd_server)

    client = sub.add_parser("client", help="take part in a run served by `fedguard server`")
    client.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    client.add_argument("--key", required=True, help="this client's key file (client-K.key from `fedguard certs`)")
    client.add_argument("--id", type=int, help="this client's id (checked against the key file)")
    client.add_argument("--ca", help="CA certificate that signed the server's certificate (default: system CAs)")
    client.add_argument("--cert", help="this client's certificate, for servers that require mutual TLS")
    client.add_argument("--cert-key", help="the private key of --cert")
    client.add_argument("--server-name", help="name to check the server certificate against (default: HOST)")
    client.add_argument("--insecure", action="store_true", help="plaintext, no TLS (loopback servers only)")
    data = client.add_mutually_exclusive_group()
    data.add_argument("--data", help="this client's own data: .npz or .safetensors with arrays x and y")
    data.add_argument("--data-dir", help="folder with the run's dataset; the client takes its partition of it")
    client.add_argument("--config", help="a local copy of the run's configuration to check against the server's")
    client.add_argument("--state-dir", help="keep this client's state in this folder (survives restarts)")
    client.add_argument("--retry-s", type=float, default=300.0, help="give up after the server is gone this long")
    client.add_argument("--threads", type=int, default=1, help="torch threads (1, as in the simulation's workers)")
    client.add_argument("--privacy-floor", type=float, default=0.0, metavar="EPSILON",
                        help="refuse a server configuration whose DP noise, counting only this client's own share, "
                             "gives it more than EPSILON against the server (docs/privacy.md)")
    client.add_argument("--privacy-floor-trusted", type=int, default=0, metavar="K",
                        help="with --privacy-floor: count the noise shares of K other honest clients too (default 0)")
    client.add_argument("--privacy-floor-delta", type=float, default=0.0, metavar="DELTA",
                        help="with --privacy-floor: account at DELTA when below the configuration's dp.delta")
    client.set_defaults(func=_cmd_client)

    cert = sub.add_parser("certs", help="make a development CA, server and client certificates and client keys")
    cert.add_argument("--out", default="certs", help="folder to write to (default: certs)")
    cert.add_argument("--clients", type=int, default=2, help="number of clients (ids 0..N-1)")
    cert.add_argument("--hosts", default="localhost,127.0.0.1,::1", help="names and IPs the server certificate is for")
    cert.add_argument("--days", type=int, default=365, help="validity in days")
    cert.add_argument("--add", type=_ids, metavar="IDS", help="add clients (e.g. 5,6) to an existing folder")
    cert.add_argument("--revoke", type=_ids, metavar="IDS", help="revoke clients in clients.json")
    cert.add_argument("--reinstate", type=_ids, metavar="IDS", help="undo a revocation")
    cert.set_defaults(func=_cmd_certs)
