"""Reading calendars: ICS over HTTP, CalDAV, and their expansion into occurrences, bounded."""
