"""The HTTP face (CONTRACT §4): one ASGI app, run by `roomkeeper web`."""
