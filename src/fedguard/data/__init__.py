"""fedguard.data."""
