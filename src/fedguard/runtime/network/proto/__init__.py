"""The versioned protocol: ``fedguard_net_v1.proto`` and its generated ``*_pb2`` module.

Regenerate after editing the .proto (from ``src/``)::

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \\
        fedguard/runtime/network/proto/fedguard_net_v1.proto
"""
