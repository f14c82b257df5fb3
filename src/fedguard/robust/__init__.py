"""fedguard.robust."""
