"""fedguard.algorithms."""
