"""fedguard.tasks."""
