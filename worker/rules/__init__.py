"""Pure decisions: the lifecycle, overrun, retry and validation rules. No I/O, no clock, no random."""
