"""``semla-client federate``: federated training on Flower's Deployment Engine (DESIGN §7).

The coordinator runs ``federate serve``: it starts a ``flower-superlink``, prints the address
owners join, submits the Flower app (:mod:`semla.client.flower_app`) with ``flwr run``, waits
for the run, and finds the unsigned bundle the ServerApp wrote; the SuperLink is shut down
whatever happens (success, failure, Ctrl-C, time limit). Each owner runs ``federate join``,
which starts a ``flower-supernode`` whose node config points at the owner's private folder.

Transport security: on real networks the SuperLink serves TLS. ``serve`` passes
``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` through to ``flower-superlink`` (the
certificate must name the host owners dial), owners pass the CA as ``join --root-certificates``
(``flower-supernode --root-certificates``). Plain text (``--insecure``) is used only on
loopback, or when asked for explicitly. Secure aggregation is separate: it hides each owner's
update from the coordinator itself, TLS hides everything from the network.

Flower 1.42 serves every API of the SuperLink on one HTTP port (``--host``/``--port``; the
default 127.0.0.1:8000 is never relied on) and starts ``flower-superexec`` by name, so the
children run with this interpreter's ``bin/`` first on PATH and a private ``FLWR_HOME``.
Telemetry, update checks and runtime dependency installation (``uv sync``) are switched off.

Modules: :mod:`.processes` (Flower child processes), :mod:`.tls`, :mod:`.appgen` (the app
``flwr run`` packs), :mod:`.run` (serve, join, run_loopback) and :mod:`.cli`.
"""

from semla.client.federate.cli import add_parser
from semla.client.federate.processes import flower_env
from semla.client.federate.run import join, run_loopback, serve, supernode_command
from semla.client.federate.tls import ServerTls

__all__ = ["ServerTls", "add_parser", "flower_env", "join", "run_loopback", "serve", "supernode_command"]
