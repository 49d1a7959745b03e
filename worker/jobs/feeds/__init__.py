"""Calendar feeds (CONTRACT §5) as a source of bookings: the registry and the sync."""
