"""Tandem's streaming server: where the URLs that Exec, Attach and PortForward return lead.

kubelet, crictl and critest connect there with SPDY/3.1 or WebSocket (Kubernetes'
remotecommand and portforward protocols); what runs behind a session is a
backend's `Process` or a TCP connection into the pod, so both backends share it.
"""
