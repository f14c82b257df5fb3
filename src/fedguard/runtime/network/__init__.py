"""fedguard.runtime.network: the server and clients as separate processes over gRPC.

``fedguard server CONFIG.toml`` serves a run; ``fedguard client --server HOST:PORT ...``
takes part with its own data; ``fedguard certs`` makes a development CA, certificates and
client keys. The protocol is in ``proto/fedguard_net_v1.proto``; the engine's
:class:`~fedguard.engine.Server` runs unchanged on :class:`server.NetworkCommunicator`.
Nothing here is imported until used, except the ``[network]`` configuration section.
"""
