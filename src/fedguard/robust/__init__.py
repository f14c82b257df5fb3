"""fedguard.robust: Byzantine-robust aggregation rules (median, trimmed mean, Krum) on plaintext updates."""
