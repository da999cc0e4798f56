"""SPDY/3.1 as Kubernetes' streaming clients speak it: `codec` (frames) and `session` (streams)."""
