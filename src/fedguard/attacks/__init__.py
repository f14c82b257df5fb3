"""fedguard.attacks: simulated adversaries (data poisoning, model poisoning, omniscient colluding attacks)."""
