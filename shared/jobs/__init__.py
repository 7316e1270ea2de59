"""Jobs: requests and their lifecycle."""
