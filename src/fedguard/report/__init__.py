"""fedguard.report."""
