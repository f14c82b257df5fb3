"""Compatibility shim: messages live in :mod:`fedguard.core.messages`."""

from fedguard.core.messages import PROTOCOL_VERSION, Message, MessageError

__all__ = ["PROTOCOL_VERSION", "Message", "MessageError"]
