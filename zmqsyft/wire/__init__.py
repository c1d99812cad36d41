"""Bytes, frames and tensors: what both halves share to talk to each other.

``messages`` (op codes, value types) ← ``schema``, ``bodies`` (typed bodies, the wire table) ←
``shm``, ``tensors``, ``values`` (values ↔ msgpack, tensors out of band) ← ``codec`` (messages ↔
frames), ``exc_codec`` (exceptions ↔ wire), ``transport`` (sockets) ← ``rpc`` (the request core).
Imports only the top-level ``errors`` and ``config``.
"""
