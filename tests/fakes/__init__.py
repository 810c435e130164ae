"""In-process fakes of remote services, so tests talk only to 127.0.0.1."""
