"""Calendar feeds (CONTRACT §5): ICS URLs and CalDAV calendars whose events become bookings."""
