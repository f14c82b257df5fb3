"""The contracts of fedguard, importing nothing above them.

* :mod:`~fedguard.core.types`: ``Params`` (name -> tensor) and helpers;
* :mod:`~fedguard.core.messages`: ``Message``, the only thing that crosses between parties;
* :mod:`~fedguard.core.communicator`: ``Communicator.exchange`` and what runtimes share;
* :mod:`~fedguard.core.state`: a client's persistent state and where it is kept;
* :mod:`~fedguard.core.pipeline`: the update pipeline (client steps, aggregator, server steps,
  server optimiser, privacy ledger) and ``ConfigurationError``;
* :mod:`~fedguard.core.algorithm`: the federated algorithm (``server_init``, ``broadcast``,
  ``client_update``, ``server_apply``), the trainer protocol and ``LocalTraining``.

Runtimes, tasks and mechanism families import from here; nothing here imports them.
"""
