"""fedguard.runtime."""
