"""Imports every mechanism family so that each registers its config section and builders.

A family registers itself on import through :func:`fedguard.config.register_section` and the
hook lists in :mod:`fedguard.builders`; add one import line here per family.
"""

from __future__ import annotations

import fedguard.attacks.register  # noqa: F401  ([attack] section: simulated adversaries)
import fedguard.builders  # noqa: F401
import fedguard.privacy.register  # noqa: F401  ([dp] section: DP-SGD, DP-FedAvg, local DP, privacy ledger)
import fedguard.robust.register  # noqa: F401  ([robust] section: median, trimmed mean, Krum)
import fedguard.runtime.network.settings  # noqa: F401  ([network] section)
import fedguard.secure.register  # noqa: F401  ([secure] section: SecAgg+ and CKKS aggregators)
import fedguard.tasks.register_generative  # noqa: F401  ([vae], [mae], [gan] sections and tasks)
