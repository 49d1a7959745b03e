"""The outside world: Whereby and its budget, outbound HTTP, signing, redaction, metrics, calendars."""
