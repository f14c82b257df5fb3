"""fedguard.privacy."""
