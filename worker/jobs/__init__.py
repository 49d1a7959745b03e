"""One module per job: load from the store, ask the rules, apply."""
