"""A throwaway self-signed certificate for TLS peers in tests (127.0.0.1 and localhost).

Built with :mod:`tests.support.tlscerts`, which also makes a CA-signed pair
(:func:`~tests.support.tlscerts.make_pki`) for tests that need a separate trust anchor.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509

from tests.support.tlscerts import (
    cert_pem,
    certificate,
    common_name,
    host_names,
    key_pem,
    new_key,
    write_files,
)


def self_signed(directory: str, name: str = "localhost") -> tuple[str, str]:
    """Write ``cert.pem`` and ``key.pem`` into ``directory``; return their paths.

    The certificate names ``name`` and 127.0.0.1 (SAN) and is its own CA, so a client can
    verify it by trusting the same file.
    """
    key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = certificate(
        name,
        common_name(name),
        key.public_key(),
        key,
        (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)),
        [(host_names(name), False), (x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    write_files((cert_path, cert_pem(cert)), (key_path, key_pem(key)))
    return cert_path, key_path
