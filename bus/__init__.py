"""The message bus: wire format, the hub, the client. Imports nothing of ours."""
