"""fedguard.pipeline."""
