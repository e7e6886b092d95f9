"""Test helpers: servers and clients the tests start (import as ``helpers.<name>``)."""
