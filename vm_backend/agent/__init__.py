"""Tandem's guest agent: runs inside each pod's VM and serves `protos/agent.proto` to the host.

It imports only the standard library and `protos.agent_pb2` (design §10): the
guest has a minimal Python with pure-Python protobuf and none of Tandem's
host-side dependencies. Keep this package free of host imports, and keep its
imports few: under TCG every module costs tens of milliseconds at boot.
"""
