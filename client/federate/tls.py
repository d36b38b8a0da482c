"""TLS for the SuperLink and the ``flwr`` CLI's connection to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path


from semla.schemas.errors import InvalidInputError


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS files (PEM), passed through to ``flower-superlink``."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path

    def __post_init__(self) -> None:
        for what, path in (("certificate", self.certfile), ("key", self.keyfile), ("CA certificate", self.ca_certfile)):
            if not Path(path).is_file():
                raise InvalidInputError(f"TLS {what} {path} does not exist")


def write_connection(home: Path, address: str, *, root_certificates: Path | None) -> None:
    """The ``flwr`` CLI's connection to the SuperLink, in ``FLWR_HOME/config.toml``."""
    import tomli_w

    conn: dict[str, object] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "semla", "semla": conn}}))
