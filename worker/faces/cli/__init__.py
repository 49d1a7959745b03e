"""The `roomkeeper` command line."""
