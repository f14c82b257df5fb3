"""fedguard.robust: Byzantine-robust aggregation rules and pre-aggregators on plaintext updates."""
