"""A throwaway CA and a server certificate for the bench's loopback HTTPS upstream.

The proxies under test verify the upstream against this CA (mitmdump via
``ssl_verify_upstream_trusted_ca``, tokenferry via ``--upstream-ca``), so every
configuration pays the same verification cost, and the passthrough probe can tell an
intercepted connection (proxy CA) from a raw tunnel (this CA, by its common name).
The certificates come from the package's dev helpers (``tokenferry.dev.certs``).
"""

from __future__ import annotations

from pathlib import Path

from tokenferry.dev.certs import TlsFiles, cert_pem, generate_ca, issue_server_cert, key_pem

CA_COMMON_NAME = "tokenferry bench CA"


def generate(directory: Path) -> TlsFiles:
    """Write ``ca.pem``, ``upstream.pem`` and ``upstream-key.pem`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = generate_ca(CA_COMMON_NAME, days=1)
    leaf_cert, leaf_key = issue_server_cert(ca_cert, ca_key, ("127.0.0.1", "localhost"), days=1)
    files = TlsFiles(
        ca_file=directory / "ca.pem",
        cert_file=directory / "upstream.pem",
        key_file=directory / "upstream-key.pem",
    )
    files.ca_file.write_bytes(cert_pem(ca_cert))
    files.cert_file.write_bytes(cert_pem(leaf_cert))
    files.key_file.write_bytes(key_pem(leaf_key))
    files.key_file.chmod(0o600)
    return files
