"""fedguard.secure."""
